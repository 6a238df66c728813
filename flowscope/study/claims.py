"""The claims of a study's source, checked on the measured frames.

A claim selects configs (``where``), takes a per-layer series (``of = "activation.std"``, or
``"probe.distinct_units"``) over the layers matching ``layers`` in execution order, and either

* reduces it to one number per config (``reduce``: first, last, mean, min, max, last/first,
  first/last, gain = geometric-mean per-layer ratio in forward order, gain_to_input = the
  same walking back toward the input (for gradients), spread = max/min) and tests it
  (``below`` / ``above`` / ``between``) — it holds when every selected config passes; or
* compares configs along a sweep axis (``across``) with ``expect``: ``increasing`` /
  ``decreasing`` (the reduced value, strictly, in axis order), ``same`` (max/min across the
  axis <= ``band``, layer by layer unless ``reduce`` is given), ``differ`` (the opposite:
  somewhere the configs differ by more than ``band``), or ``power`` (log-log slope
  of the reduced value against the axis within ``tol`` of ``power``); the other axes and the
  seed form separate groups, and each must pass.

The verdict keeps the numbers: one value per config (or group) and the condition's bounds.
Thresholds come from the source's wording and are not tuned to make claims pass.

**Seeds.** A study runs every setting (one value of each sweep axis) with several seeds. A
claim is judged per setting over its seeds: *held* when every seed passes in every setting,
*not held* when every seed fails in some setting, and *inconclusive* otherwise (the seeds
disagree: the measured value straddles the threshold). The verdict carries ``seeds`` (how
many), ``interval`` ([low, high] of the judged value over the seeds, per setting) and the
``rule``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from flowscope.core.columns import RESERVED
from flowscope.core.errors import FlowscopeError, unknown
from flowscope.study.spec import REDUCERS, matches

SERIES_KEYS = ("config", "seed", "step", "layer_idx", "layer")


STATUSES = ("held", "not held", "inconclusive", "not measured")
SEED_RULE = (
    "held when every seed passes in every setting; not held when every measured seed fails in"
    " some setting; otherwise inconclusive (a seed with no finite value is not measured)"
)


@dataclass
class Verdict:
    """The outcome of one claim: ``status`` is one of STATUSES; ``held`` is True / False
    for held / not held and None otherwise."""

    id: str
    text: str
    held: bool | None  # None: inconclusive, or nothing measured matched the claim
    detail: str
    numbers: dict[str, Any] = field(default_factory=dict)
    where: dict[str, Any] = field(default_factory=dict)
    note: str = ""
    status: str = "not measured"
    origin: str = "lecture"  # lecture | theory | flowscope: who makes the claim

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def judge(self, outcomes: dict[str, list[bool]], unmeasured: int = 0) -> None:
        """Set ``held`` and ``status`` from each setting's per-seed outcomes. ``unmeasured``
        seeds (a non-finite value: the quantity is undefined there) are in no list: with
        any of them the claim is at best inconclusive, and with nothing measured, not
        measured."""
        outcomes = {label: seeds for label, seeds in outcomes.items() if seeds}
        if not outcomes:
            self.held, self.status = None, "not measured"
        elif any(not any(seeds) for seeds in outcomes.values()):
            self.held, self.status = False, "not held"
        elif all(all(seeds) for seeds in outcomes.values()) and not unmeasured:
            self.held, self.status = True, "held"
        else:
            self.held, self.status = None, "inconclusive"


def evaluate(
    claims: list[dict[str, Any]],
    stats: pd.DataFrame,
    probes: pd.DataFrame,
    axis_columns: list[str],
) -> list[Verdict]:
    """Every claim's verdict on a study's merged frames."""
    index = ClaimFrames(stats, probes)  # the frames are grouped once for every claim
    return [_evaluate(c, index, axis_columns) for c in claims]


def evaluate_one(
    claim: dict[str, Any], stats: pd.DataFrame, probes: pd.DataFrame, axis_columns: list[str]
) -> Verdict:
    """One claim's verdict (``evaluate`` does many on the same frames)."""
    return _evaluate(claim, ClaimFrames(stats, probes), axis_columns)


def _evaluate(claim: dict[str, Any], index: ClaimFrames, axis_columns: list[str]) -> Verdict:
    series = index.series(claim, where=claim.get("where", {}))
    if "divide_by" in claim and not series.empty:
        series = _divided(claim, series, index)
    base = Verdict(
        claim["id"],
        claim["text"],
        None,
        "",
        where=claim.get("where", {}),
        note=claim.get("note", ""),
        origin=claim.get("origin", "lecture"),
    )
    if series.empty:
        base.detail = "no measured layer matched this claim (check where/of/layers)"
        return base
    if "expect" in claim:
        return _across(claim, series, axis_columns, base)
    values = _per_config(series, claim["reduce"])
    predicted = None
    if "predicted" in claim:
        predicted = _predicted(claim, series, index)
        measured, values = values, (values / predicted).rename("value")
    ok, bound = _condition(claim, values)
    setting = _settings(series, axis_columns)  # config -> its setting's label
    outcomes: dict[str, list[bool]] = {}
    judged: dict[str, list[float]] = {}
    unmeasured = []
    for config, passed, value in zip(values.index, ok.to_numpy(), values.to_numpy(), strict=True):
        if not math.isfinite(value):  # e.g. no live gradient row: the seed says nothing
            unmeasured.append(config)
            continue
        outcomes.setdefault(setting[config], []).append(bool(passed))
        judged.setdefault(setting[config], []).append(float(value))
    base.judge(outcomes, unmeasured=len(unmeasured))
    base.numbers = {
        "value": {k: _num(v) for k, v in values.items()},
        **bound,
        **_seed_numbers(judged, series),
    }
    if predicted is not None:
        base.numbers["measured"] = {k: _num(v) for k, v in measured.items()}
        base.numbers["predicted"] = {k: _num(v) for k, v in predicted.items()}
        base.numbers["predicted_by"] = claim["predicted"]
    failed = values[~ok & np.isfinite(values)]
    worst = failed.index[0] if len(failed) else None
    base.detail = _describe(claim, values, bound, worst)
    if predicted is not None:
        both = list(zip(measured, predicted, strict=True))[:3]
        pairs = [f"{_fmt(m)} vs {_fmt(p)}" for m, p in both]
        base.detail = (
            f"measured / {claim['predicted']} predicted: " + base.detail
            + f" (measured vs predicted: {'; '.join(pairs)})"
        )  # fmt: skip
    if unmeasured:
        base.numbers["unmeasured"] = [_label(c) for c in unmeasured]
        where = ", ".join(map(_label, unmeasured))
        base.detail += f" — not measurable (no finite value) at {where}"
    return base


def _settings(series: pd.DataFrame, axis_columns: list[str]) -> dict[Any, str]:
    """Each config's setting: the values of the sweep axes that vary among the claim's
    configs, as a label ("all" when none varies); configs of one setting differ by seed
    (two with the same seed too are settings of their own)."""
    ones = series.drop_duplicates("config")
    varying = [c for c in axis_columns if c in ones and ones[c].nunique() > 1]
    seeds = ones["seed"] if "seed" in ones else pd.Series(0, index=ones.index)
    labels: dict[Any, str] = {}
    seen: set[tuple[str, Any]] = set()
    for config, seed, *values in zip(ones["config"], seeds, *(ones[c] for c in varying),
                                     strict=True):  # fmt: skip
        label = ",".join(f"{c}={v}" for c, v in zip(varying, values, strict=True)) or "all"
        if (label, seed) in seen:
            label = f"{label} ({config})"
        seen.add((label, seed))
        labels[config] = label
    return labels


def _seed_numbers(judged: dict[str, list[float]], series: pd.DataFrame) -> dict[str, Any]:
    """``seeds``, ``interval`` ([low, high] per setting) and ``rule`` of a verdict."""
    seeds = int(series["seed"].nunique()) if "seed" in series else 1
    interval = {}
    for label, vals in judged.items():
        finite = [v for v in vals if math.isfinite(v)]
        interval[label] = [_num(min(finite)), _num(max(finite))] if finite else [None, None]
    return {"seeds": seeds, "interval": interval, "rule": SEED_RULE}


def _divided(claim: dict[str, Any], series: pd.DataFrame, index: ClaimFrames) -> pd.DataFrame:
    """The series over ``layers`` divided, layer by layer in execution order, by the same
    statistic over the layers ``divide_by`` names (a block's pre-activation gradient over
    its activation's output gradient: the activation's local factor)."""
    den = index.series({**claim, "layers": claim["divide_by"]}, where=claim.get("where", {}))
    num_counts = series.groupby("config", sort=False).size()
    den_counts = den.groupby("config", sort=False).size()
    if not num_counts.equals(den_counts.reindex(num_counts.index)):
        raise FlowscopeError(
            f"claim {claim['id']}: divide_by {claim['divide_by']!r} selects "
            f"{den_counts.to_dict()} layers per config, layers {claim.get('layers')!r} "
            f"selects {num_counts.to_dict()}: they are divided one by one"
        )
    with np.errstate(divide="ignore", invalid="ignore"):
        values = series["value"].to_numpy(dtype=float) / den["value"].to_numpy(dtype=float)
    return series.assign(value=values)


def _predicted(claim: dict[str, Any], series: pd.DataFrame, index: ClaimFrames) -> pd.Series:
    """Per config, the ``predicted`` probe's series over the same layers, reduced the same
    way: what theory says the measured number should be."""
    pred = index.series({**claim, "of": claim["predicted"]}, where=claim.get("where", {}))
    mine = series.groupby("config", sort=False)["layer"].apply(tuple)
    theirs = pred.groupby("config", sort=False)["layer"].apply(tuple).reindex(mine.index)
    if not mine.equals(theirs):
        bad = next(c for c in mine.index if mine[c] != theirs[c])
        got = list(theirs[bad]) if isinstance(theirs[bad], tuple) else []
        raise FlowscopeError(
            f"claim {claim['id']}: {claim['predicted']} predicts layers {got} at "
            f"{_label(bad)}, the claim measures {list(mine[bad])}: they must be the same"
        )
    return _per_config(pred, claim["reduce"]).reindex(mine.index)


def layer_series(claim: dict[str, Any], stats: pd.DataFrame, probes: pd.DataFrame) -> pd.DataFrame:
    """Rows (config columns, layer, value) in execution order, at the claim's step."""
    return ClaimFrames(stats, probes).series(claim)


class ClaimFrames:
    """A study's stats and probes split once by what claims select on (stats: kind and tensor
    at call 0; probes: the probe); each claim then selects its rows of one slice with numpy
    masks and takes them once (pandas costs ~0.1-0.5 ms per operation, and a study has ~20
    claims of ~8 operations each)."""

    def __init__(self, stats: pd.DataFrame, probes: pd.DataFrame) -> None:
        call0 = stats[stats["call"] == 0]
        by_kind = call0.groupby(["kind", "tensor"], sort=False, dropna=False)
        self._stats = {key: _Slice(frame) for key, frame in by_kind}
        by_probe = probes.groupby("probe", sort=False, dropna=False)
        self._probes = {key: _Slice(frame) for key, frame in by_probe}
        self._no_stats, self._no_probes = call0.iloc[:0], probes.iloc[:0]
        # what a series keeps besides its statistic: the config columns and where in the net
        self._front = [c for c in stats.columns if c not in RESERVED or c in SERIES_KEYS]

    def series(self, claim: dict[str, Any], where: dict[str, Any] | None = None) -> pd.DataFrame:
        """Rows (config columns, layer, value) in execution order, at the claim's step; with
        ``where`` (column -> value or list of values), only the rows it allows."""
        source, _, stat = claim["of"].partition(".")
        if source == "probe":
            part = self._probes.get(stat)
            if part is None:
                return self._no_probes.assign(value=[])
            keep = part.at_step(claim)
            layer_idx = np.cumsum(keep) - 1  # probe rows come in layer order
        else:
            tensor = claim.get("tensor", "weight" if source.startswith("weight") else "")
            part = self._stats.get((source, tensor))
            if part is None:
                empty = self._no_stats[[*self._front, stat]]
                return empty.rename(columns={stat: "value"})
            keep = part.at_step(claim)
            layer_idx = part.column("layer_idx")
        glob = claim.get("layers")
        if glob is not None:  # each layer name matched once, not once per row
            names = part.column("layer")
            hit = {name: matches(glob, name) for name in set(names)}
            keep &= np.fromiter((hit[name] for name in names), dtype=bool, count=len(names))
        for column, wanted in (where or {}).items():
            allowed = wanted if isinstance(wanted, list) else [wanted]
            keep &= part.frame[column].isin(allowed).to_numpy()
        rows = np.flatnonzero(keep)
        rows = rows[np.lexsort((layer_idx[rows], part.configs()[rows]))]  # stable
        if source == "probe":
            return part.frame.iloc[rows].assign(layer_idx=layer_idx[rows])
        positions = part.frame.columns.get_indexer(pd.Index([*self._front, stat]))
        picked = part.frame.iloc[rows, positions]  # one take (frame[cols].take: 40 -> 60 ms)
        return picked.set_axis([*self._front, "value"], axis=1)


class _Slice:
    """One slice of ClaimFrames and its columns as numpy arrays, made on first use."""

    def __init__(self, frame: pd.DataFrame) -> None:
        self.frame = frame
        self._columns: dict[str, np.ndarray] = {}
        self._ranks: np.ndarray | None = None

    def column(self, name: str) -> np.ndarray:
        if name not in self._columns:
            self._columns[name] = self.frame[name].to_numpy()
        return self._columns[name]

    def configs(self) -> np.ndarray:
        """Each row's config as its rank in sorted order (what sorting by config sorts by)."""
        if self._ranks is None:
            self._ranks = pd.factorize(self.frame["config"], sort=True)[0]
        return self._ranks

    def at_step(self, claim: dict[str, Any]) -> np.ndarray:
        """Rows at the claim's step: its ``step`` key, else each config's last recorded step."""
        steps = self.column("step")
        if "step" in claim:
            return steps == claim["step"]
        configs = self.configs()
        last = np.full(configs.max() + 1, np.iinfo(np.int64).min)
        np.maximum.at(last, configs, steps)
        return steps == last[configs]


def _per_config(series: pd.DataFrame, how: str) -> pd.Series:
    """``reduce_series`` of each config's run of rows (a series comes sorted by config)."""
    config = series["config"].to_numpy()
    starts = np.flatnonzero(np.r_[True, config[1:] != config[:-1]])
    runs = np.split(series["value"].to_numpy(dtype=float), starts[1:])
    index = pd.Index(config[starts], name="config")
    return pd.Series([reduce_series(v, how) for v in runs], index=index, name="value")


def reduce_series(v: np.ndarray, how: str) -> float:
    """One number from a per-layer series (execution order)."""
    if v.size == 0:
        return math.nan
    with np.errstate(divide="ignore", invalid="ignore"):
        if how == "first":
            return float(v[0])
        if how == "last":
            return float(v[-1])
        if how == "mean":
            return float(np.mean(v))
        if how == "min":
            return float(np.min(v))
        if how == "max":
            return float(np.max(v))
        if how == "last/first":
            return float(v[-1] / v[0])
        if how == "first/last":
            return float(v[0] / v[-1])
        if how == "gain":
            return float((v[-1] / v[0]) ** (1.0 / max(v.size - 1, 1)))
        if how == "gain_to_input":  # per-layer factor walking back toward the input
            return float((v[0] / v[-1]) ** (1.0 / max(v.size - 1, 1)))
        if how == "spread":
            return float(np.max(v) / np.min(v))
        if how == "depth_scale":  # layers over which the series shrinks by e (ξ of e^(-l/ξ))
            ratio = float(v[-1] / v[0]) if v.size > 1 else math.nan
            if not ratio > 0:  # a sign change, a zero or a single layer: no scale
                return math.nan
            return math.inf if ratio == 1 else -(v.size - 1) / math.log(ratio)
    raise unknown("reduce", how, REDUCERS)


def _condition(claim: dict[str, Any], values: pd.Series) -> tuple[pd.Series, dict[str, Any]]:
    if "below" in claim:
        return values < claim["below"], {"below": claim["below"]}
    if "above" in claim:
        return values > claim["above"], {"above": claim["above"]}
    lo, hi = claim["between"]
    return (values >= lo) & (values <= hi), {"between": [lo, hi]}


def _describe(claim: dict[str, Any], values: pd.Series, bound: dict[str, Any], worst: Any) -> str:
    rule = ", ".join(f"{k} {v}" for k, v in bound.items())
    shown = "; ".join(f"{_label(k)}: {_fmt(v)}" for k, v in list(values.items())[:6])
    more = f" (+{len(values) - 6} more)" if len(values) > 6 else ""
    head = f"{claim['reduce']} of {claim['of']}"
    tail = f" — fails at {_label(worst)}" if worst is not None else ""
    return f"{head} ({rule}): {shown}{more}{tail}"


def _across(
    claim: dict[str, Any], series: pd.DataFrame, axis_columns: list[str], base: Verdict
) -> Verdict:
    axis = claim["across"]
    if axis not in series.columns:
        raise unknown("claim 'across' axis", axis, axis_columns, claim["id"])
    others = [c for c in axis_columns if c != axis and series[c].nunique() > 1]
    seeds = sorted(series["seed"].unique()) if "seed" in series else [None]
    groups = series.groupby(others, sort=False) if others else [((), series)]
    results: dict[str, Any] = {}
    outcomes: dict[str, list[bool]] = {}
    judged: dict[str, list[float]] = {}
    unmeasured = 0
    for key, group in groups:
        keys = key if isinstance(key, tuple) else (key,)
        label = ",".join(f"{c}={v}" for c, v in zip(others, keys, strict=False)) or "all"
        for seed in seeds:  # the axis is compared within one seed; seeds judged together
            one = group if seed is None else group[group["seed"] == seed]
            tag = label if len(seeds) == 1 else f"{label},seed={seed}"
            if one[axis].nunique() < 2:  # one point: nothing to compare along the axis
                results[tag] = f"one value of {axis}"
                unmeasured += 1
                continue
            ok, number = _expect(claim, one, axis)
            results[tag] = number
            outcomes.setdefault(label, []).append(ok)
            if isinstance(number, float | int):
                judged.setdefault(label, []).append(float(number))
            else:  # increasing / decreasing: each point along the axis has its interval
                for point, value in number.items():
                    at = f"{label},{axis}={point}" if others else f"{axis}={point}"
                    judged.setdefault(at, []).append(math.nan if value is None else value)
    base.judge(outcomes, unmeasured)
    base.numbers = {
        "value": results,
        "expect": claim["expect"],
        "across": axis,
        **_seed_numbers(judged, series),
    }
    for setting in ("band", "power", "tol"):
        if setting in claim:
            base.numbers[setting] = claim[setting]
    base.detail = f"{claim['expect']} across {axis} of {claim['of']}: " + "; ".join(
        f"{k}: {_fmt(v) if not isinstance(v, dict) else v}" for k, v in list(results.items())[:6]
    )
    return base


def _expect(claim: dict[str, Any], group: pd.DataFrame, axis: str) -> tuple[bool, Any]:
    expect = claim["expect"]
    if expect in ("same", "differ") and "reduce" not in claim:
        per_layer = group.groupby("layer", sort=False)["value"].agg(lambda s: s.max() / s.min())
        if expect == "differ":  # the layer where the configs differ most must exceed the band
            return float(per_layer.max()) > claim.get("band", 1.5), float(per_layer.max())
        worst = float(per_layer.max())
        return worst <= claim.get("band", 1.5), worst
    reduced = group.groupby(axis)["value"].apply(
        lambda s: reduce_series(s.to_numpy(), claim["reduce"])
    )
    reduced = reduced.sort_index()
    vals = reduced.to_numpy(dtype=float)
    if expect in ("same", "differ"):
        spread = float(vals.max() / vals.min())
        band = claim.get("band", 1.5)
        ok = spread <= band if expect == "same" else spread > band
        return ok, spread
    if expect in ("increasing", "decreasing"):
        steps = np.diff(vals)
        ok = bool((steps > 0).all() if expect == "increasing" else (steps < 0).all())
        return ok, {str(k): _num(v) for k, v in reduced.items()}
    x = np.log(np.asarray(reduced.index, dtype=float))
    slope = float(np.polyfit(x, np.log(vals), 1)[0])
    return abs(slope - claim["power"]) <= claim.get("tol", 0.1), slope


def _label(config: Any) -> str:
    """Drop the numeric prefix of a config id for display."""
    text = str(config)
    return text.split("-", 1)[1] if "-" in text[:4] else text


def _fmt(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float | np.floating) else str(v)


def _num(v: Any) -> Any:
    if isinstance(v, float | np.floating):
        return None if math.isnan(v) else float(v)
    return v
