"""Study files: load a TOML study, validate it whole before any work, expand its grid.

A study names its source, a net, an init, data, sweep axes (cartesian product), run settings
and the source's claims. Keys are dotted paths into the spec (``net.activation``,
``init.name``, ``run.steps``); the frame column of an axis is its last part (``activation``),
except ``init.name`` which is ``init``.

Study files are data: they are parsed with ``tomllib`` and never executed.
"""

from __future__ import annotations

import copy
import fnmatch
import hashlib
import itertools
import json
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import tomllib

from flowscope.core.columns import RESERVED
from flowscope.core.errors import FlowscopeError, unknown

TOP_KEYS = {
    "name", "title", "description", "source", "net", "init", "data", "sweep", "run", "claim",
    "presets",
}  # fmt: skip
RUN_DEFAULTS: dict[str, Any] = {
    "steps": 0,  # 0 = one forward/backward at init; > 0 = SGD steps on the data
    "seeds": [0],
    "device": "cpu",
    "dtype": "float32",
    "loss": "cross_entropy",
    "lr": 0.1,
    "record_every": 1,  # with steps > 0: record every k-th step (and the last)
    "mode": "train",  # train | eval: module mode during the recorded passes
    "warmup": 0,  # train-mode forward passes before recording (batchnorm running stats)
    "kinds": ["activation", "gradient", "weight_grad"],
    "modules": [],  # name globs; empty = every leaf module
    "bins": 64,
    "hist_sample": 16384,
    "probes": [],
}
RUN_CHOICES = {
    "device": ("cpu", "cuda"),
    "dtype": ("float32", "float64", "bfloat16"),
    "loss": ("cross_entropy", "mse", "sum_squares"),
    "mode": ("train", "eval"),
}
CLAIM_KEYS = {
    "id", "text", "where", "of", "layers", "tensor", "reduce", "below", "above", "between",
    "across", "expect", "band", "power", "tol", "note", "step",
}  # fmt: skip


# what a claim may ask for (flowscope.study.claims evaluates them)
REDUCERS = (
    "first", "last", "mean", "min", "max", "last/first", "first/last", "gain", "gain_to_input",
    "spread",
)  # fmt: skip
EXPECTS = ("increasing", "decreasing", "same", "differ", "power")
STAT_KINDS = ("activation", "gradient", "weight", "weight_grad")
STAT_COLUMNS = (
    "mean", "std", "rms", "min", "max", "absmax", "frac_zero", "frac_saturated", "nan", "inf",
)  # fmt: skip


@dataclass(frozen=True)
class Config:
    """One run of a study: the axis values, the seed, and the fully resolved sections."""

    index: int
    axes: dict[str, Any]
    seed: int
    net: dict[str, Any]
    init: dict[str, Any]
    data: dict[str, Any]
    run: dict[str, Any]

    @property
    def id(self) -> str:
        """A readable, file-safe, unique id: ``003-activation=relu,init=he,seed=0``."""
        parts = ",".join(f"{k}={_short(v)}" for k, v in {**self.axes, "seed": self.seed}.items())
        return f"{self.index:03d}-{re.sub(r'[^A-Za-z0-9=,._+-]', '_', parts)}"

    def columns(self) -> dict[str, Any]:
        """The config columns added to every frame row of this run."""
        return {"config": self.id, **{k: _cell(v) for k, v in self.axes.items()}, "seed": self.seed}


@dataclass(frozen=True)
class Study:
    """A validated study spec."""

    name: str
    title: str
    description: str
    source: dict[str, str]
    net: dict[str, Any]
    init: dict[str, Any]
    data: dict[str, Any]
    sweep: dict[str, list[Any]]
    run: dict[str, Any]
    claims: list[dict[str, Any]]
    presets: dict[str, dict[str, str]] = field(default_factory=dict)
    path: str = ""

    @property
    def axis_columns(self) -> list[str]:
        return [column_of(key) for key in self.sweep]

    def to_dict(self) -> dict[str, Any]:
        """The resolved spec, as written to spec.json."""
        return {
            "name": self.name,
            "title": self.title,
            "description": self.description,
            "source": self.source,
            "net": self.net,
            "init": self.init,
            "data": self.data,
            "sweep": self.sweep,
            "run": self.run,
            "claims": self.claims,
            "presets": self.presets,
        }

    def fingerprint(self) -> str:
        """Hash of everything that determines the measurements (not titles or claims)."""
        core = {k: self.to_dict()[k] for k in ("net", "init", "data", "sweep", "run", "presets")}
        return hashlib.sha256(json.dumps(core, sort_keys=True).encode()).hexdigest()[:16]

    def configs(self) -> list[Config]:
        """The cartesian product of the sweep axes, times the seeds."""
        keys = list(self.sweep)
        out: list[Config] = []
        for values in itertools.product(*(self.sweep[k] for k in keys)):
            for seed in self.run["seeds"]:
                sections = {s: copy.deepcopy(getattr(self, s)) for s in ("net", "init", "data")}
                sections["run"] = copy.deepcopy(self.run)
                for key, value in zip(keys, values, strict=True):
                    section, _, leaf = key.partition(".")
                    sections[section][leaf] = value
                axes = {column_of(k): v for k, v in zip(keys, values, strict=True)}
                out.append(Config(index=len(out), axes=axes, seed=int(seed), **sections))
        return out


def column_of(key: str) -> str:
    """Frame column of a sweep key: its last part (``init.name`` -> ``init``), or
    ``section_leaf`` where the last part is a column of the frames (``init.std`` ->
    ``init_std``, never ``std``, which is a statistic)."""
    if key == "init.name":
        return "init"
    section, _, leaf = key.rpartition(".")
    return f"{section}_{leaf}" if leaf in RESERVED else leaf


def _short(value: Any) -> str:
    return json.dumps(value) if isinstance(value, list | dict) else str(value)


def _cell(value: Any) -> Any:
    return json.dumps(value) if isinstance(value, list | dict) else value


# -- finding and loading ------------------------------------------------------------------------


def builtin_dir() -> Path:
    """Where the built-in study files are: inside the wheel, or ``studies/`` in a checkout."""
    packaged = Path(str(resources.files("flowscope"))) / "studies"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[2] / "studies"


def builtin_names() -> list[str]:
    return sorted(p.stem for p in builtin_dir().glob("*.toml"))


def find(name_or_path: str) -> Path:
    """A built-in study by name, or a user's TOML file by path."""
    path = Path(name_or_path)
    if path.is_dir():
        raise FlowscopeError(f"study file {name_or_path!r} is a directory, not a TOML file")
    if path.suffix == ".toml" or path.exists():
        if not path.is_file():
            raise FlowscopeError(f"study file {name_or_path!r} does not exist")
        return path
    candidate = builtin_dir() / f"{name_or_path}.toml"
    if not candidate.is_file():
        raise unknown("study", name_or_path, builtin_names())
    return candidate


def load(name_or_path: str, overrides: list[str] | tuple[str, ...] = ()) -> Study:
    """Read, override (``key=value`` with TOML values) and validate a study.

    Example:
        >>> study = load("init-scales", ["run.seeds=[0, 1]"])  # doctest: +SKIP
        >>> len(study.configs())  # doctest: +SKIP
        32

    Raises:
        FlowscopeError: unreadable TOML, unknown keys or names (with did-you-mean), values
            out of range — naming the file and the key.
    """
    path = find(name_or_path)
    try:
        raw = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise FlowscopeError(f"{path}: not valid TOML: {err}") from err
    except OSError as err:
        raise FlowscopeError(f"cannot read study file {str(path)!r}: {err.strerror}") from err
    for item in overrides:
        apply_override(raw, item)
    return validate(raw, str(path))


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Set ``a.b=value`` in the raw spec; the value is parsed as TOML, else taken as a string."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise FlowscopeError(f"--set needs key=value (e.g. run.steps=10), got {item!r}")
    try:
        value = tomllib.loads(f"v = {text.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = text.strip()
    node = raw
    *parents, leaf = key.split(".")
    if parents and parents[0] == "sweep":  # sweep axes are dotted keys themselves
        parents, leaf = ["sweep"], key.partition(".")[2]
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise FlowscopeError(f"--set {key}: {part!r} is not a table")
    node[leaf] = value


# -- validation ---------------------------------------------------------------------------------


def validate(raw: dict[str, Any], where: str = "<study>") -> Study:
    """A :class:`Study` from a parsed TOML table, or the first problem found, clearly."""
    for key in raw:
        if key not in TOP_KEYS:
            raise unknown("study key", key, TOP_KEYS, where)
    name = _need(raw, "name", str, where)
    net = _section(raw, "net", where)
    init = _section(raw, "init", where)
    data = _section(raw, "data", where)
    run = _run(raw.get("run", {}), where)
    sweep = _sweep(raw.get("sweep", {}), where)
    presets = _presets(raw.get("presets", {}), where)
    study = Study(
        name=name,
        title=str(raw.get("title", name)),
        description=str(raw.get("description", "")),
        source=_source(raw.get("source", {}), where),
        net=net,
        init=init,
        data=data,
        sweep=sweep,
        run=run,
        claims=[],
        presets=presets,
        path=where,
    )
    configs = study.configs()
    for config in configs:
        check_config(study, config, f"{where}, config {config.index + 1} of {len(configs)}")
    claims = [_claim(c, i, study, where) for i, c in enumerate(raw.get("claim", []))]
    return Study(**{**study.__dict__, "claims": claims})


TOML_TYPES: dict[type, str] = {dict: "table", str: "string", list: "list"}


def _need(raw: dict[str, Any], key: str, kind: type, where: str) -> Any:
    if key not in raw:
        raise FlowscopeError(f"{where}: missing required key {key!r}")
    if not isinstance(raw[key], kind):
        what = TOML_TYPES.get(kind, kind.__name__)
        raise FlowscopeError(f"{where}: {key!r} must be a {what}, got {raw[key]!r}")
    return raw[key]


def _presets(presets: Any, where: str) -> dict[str, dict[str, str]]:
    """``[presets]``: named tables of layer glob = init scheme."""
    if not isinstance(presets, dict):
        raise FlowscopeError(f"{where}: [presets] must be a table of tables, got {presets!r}")
    for name, table in presets.items():
        if not isinstance(table, dict):
            raise FlowscopeError(f"{where}: [presets] must be tables; {name!r} is {table!r}")
    return {k: dict(v) for k, v in presets.items()}


def _section(raw: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    section = _need(raw, key, dict, where)
    if "name" not in section:
        raise FlowscopeError(f"{where}: [{key}] needs a 'name'")
    return dict(section)


def _source(source: Any, where: str) -> dict[str, str]:
    if not isinstance(source, dict) or not {"file", "lines"} <= set(source):
        raise FlowscopeError(
            f"{where}: [source] needs 'file' and 'lines' (the seed lecture this reproduces)"
        )
    return {k: str(v) for k, v in source.items()}


def _run(run: Any, where: str) -> dict[str, Any]:
    if not isinstance(run, dict):
        raise FlowscopeError(f"{where}: [run] must be a table")
    for key in run:
        if key not in RUN_DEFAULTS:
            raise unknown("run setting", key, RUN_DEFAULTS, where)
    merged = {**copy.deepcopy(RUN_DEFAULTS), **run}
    if isinstance(merged["seeds"], int):
        merged["seeds"] = [merged["seeds"]]
    _check_run_values(merged, where)
    return merged


def _check_run_values(run: dict[str, Any], where: str) -> None:
    for key, choices in RUN_CHOICES.items():
        if run[key] not in choices:
            raise unknown(f"run.{key}", run[key], choices, where)
    for key, low in (("steps", 0), ("record_every", 1), ("warmup", 0)):
        value = run[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise FlowscopeError(f"{where}: run.{key} must be an integer >= {low}, got {value!r}")
    lr = run["lr"]
    if not isinstance(lr, int | float) or isinstance(lr, bool) or not lr > 0:
        raise FlowscopeError(f"{where}: run.lr must be a number > 0, got {lr!r}")
    seeds = run["seeds"]
    if not isinstance(seeds, list) or not seeds or not all(_is_int(s) for s in seeds):
        raise FlowscopeError(
            f"{where}: run.seeds must be a non-empty list of integers (or one), got {seeds!r}"
        )
    from flowscope.record.recorder import check_kinds, hist_spec
    from flowscope.study.probes import PROBES  # torch only; safe here

    for key in ("kinds", "modules", "probes"):
        if not isinstance(run[key], list) or not all(isinstance(v, str) for v in run[key]):
            raise FlowscopeError(f"{where}: run.{key} must be a list of strings, got {run[key]!r}")
    try:  # the recorder's own checks, named as the study file names them
        check_kinds(run["kinds"], "run.kinds", "run.kinds entry")
        hist_spec(run["bins"], run["hist_sample"], 1, prefix="run.")
    except FlowscopeError as err:
        raise FlowscopeError(f"{where}: {err}") from None
    for probe in run["probes"]:
        PROBES.get(probe, where)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _sweep(sweep: Any, where: str) -> dict[str, list[Any]]:
    if not isinstance(sweep, dict):
        raise FlowscopeError(f"{where}: [sweep] must be a table of lists")
    out: dict[str, list[Any]] = {}
    for key, values in sweep.items():
        section, dot, leaf = key.partition(".")
        if key == "init":
            key, section, dot, leaf = "init.name", "init", ".", "name"
        if not dot or section not in ("net", "init", "data", "run"):
            raise FlowscopeError(
                f"{where}: sweep axis {key!r} must be a dotted key under net., init., data. "
                "or run. (e.g. 'net.activation', 'init.name', 'run.lr')"
            )
        if section == "run" and leaf not in RUN_DEFAULTS:
            raise unknown("run setting", leaf, RUN_DEFAULTS, f"{where}, sweep axis {key!r}")
        if not isinstance(values, list) or not values:
            raise FlowscopeError(
                f"{where}: sweep axis {key!r} needs a non-empty list of values, got {values!r}"
            )
        out[key] = values
    columns = [column_of(k) for k in out]
    clash = {c for c in columns if columns.count(c) > 1 or c in RESERVED}
    if clash:
        raise FlowscopeError(f"{where}: sweep axes give clashing column names {sorted(clash)}")
    return out


def check_config(study: Study, config: Config, where: str) -> None:
    """Every name and argument of one expanded config, checked without building anything."""
    from flowscope.models.inits import INITS
    from flowscope.models.nets import NETS
    from flowscope.study.data import DATA

    net = dict(config.net)
    _try_build(NETS.check_args(net.pop("name"), net, where), net, "meta", where)
    data = dict(config.data)
    _try_build(DATA.check_args(data.pop("name"), data, where), data, "cpu", where)
    _check_run_values(config.run, where)
    init = dict(config.init)
    scheme = init.pop("name")
    overrides = init.pop("overrides", {})
    if not isinstance(overrides, dict):
        raise FlowscopeError(f"{where}: init.overrides must be a table of layer glob = scheme")
    for glob, layer_scheme in overrides.items():
        INITS.get(layer_scheme, f"{where}, init.overrides entry {glob!r}")
    if scheme in study.presets:
        for glob, layer_scheme in study.presets[scheme].items():
            INITS.get(layer_scheme, f"{where}, preset {scheme!r} entry {glob!r}")
        if init:
            raise FlowscopeError(f"{where}: init preset {scheme!r} takes no parameters: {init}")
    else:
        if scheme not in INITS:
            allowed = [*INITS.names(), *study.presets]
            raise unknown("init", scheme, allowed, where)
        try:
            INITS.get(scheme).resolve(init)
        except FlowscopeError as err:
            raise FlowscopeError(f"{where}: {err}") from None


_BUILT: set[str] = set()


def _try_build(factory: Any, kwargs: dict[str, Any], device: str, where: str) -> None:
    """Build once to check the values: nets on the meta device (free), data on the CPU."""
    import torch

    key = json.dumps([getattr(factory, "__name__", ""), kwargs, device], sort_keys=True)
    if key in _BUILT:
        return
    try:
        if device == "meta":
            with torch.device("meta"):
                factory(**kwargs)
        else:
            factory(**kwargs, device=torch.device("cpu"))
    except FlowscopeError as err:
        raise FlowscopeError(f"{where}: {err}") from None
    _BUILT.add(key)


def _claim(raw: Any, index: int, study: Study, where: str) -> dict[str, Any]:
    place = f"{where}, claim {index + 1}"
    if not isinstance(raw, dict):
        raise FlowscopeError(f"{place}: each [[claim]] must be a table")
    for key in raw:
        if key not in CLAIM_KEYS:
            raise unknown("claim key", key, CLAIM_KEYS, place)
    for key in ("id", "text", "of"):
        _need(raw, key, str, place)

    claim = dict(raw)
    claim.setdefault("where", {})
    columns = set(study.axis_columns) | {"seed"}
    for column in claim["where"]:
        if column not in columns:
            raise unknown("claim 'where' column", column, columns, f"{place} ({raw['id']})")
    check_claim_spec(claim, f"{place} ({raw['id']})")
    return claim


def matches(glob: str | None, name: str) -> bool:
    """Layer selection in claims and presets: a glob on the qualified name (None = all)."""
    return glob is None or fnmatch.fnmatchcase(name, glob)


def check_claim_spec(claim: dict[str, Any], where: str) -> None:
    """Validate one claim table (called while loading the study)."""
    source, _, stat = claim["of"].partition(".")
    if source == "probe":
        from flowscope.study.probes import PROBES

        PROBES.get(stat, where)
    elif source not in STAT_KINDS:
        raise unknown("claim 'of' kind", source, [*STAT_KINDS, "probe"], where)
    elif stat not in STAT_COLUMNS:
        raise unknown("claim 'of' statistic", stat, STAT_COLUMNS, where)
    if "reduce" in claim and claim["reduce"] not in REDUCERS:
        raise unknown("reduce", claim["reduce"], REDUCERS, where)
    tests = [k for k in ("below", "above", "between", "expect") if k in claim]
    if len(tests) != 1:
        raise FlowscopeError(
            f"{where}: a claim needs exactly one of below, above, between, expect; got {tests}"
        )
    if "expect" in claim:
        if claim["expect"] not in EXPECTS:
            raise unknown("expect", claim["expect"], EXPECTS, where)
        if "across" not in claim:
            raise FlowscopeError(f"{where}: expect={claim['expect']!r} needs across = AXIS")
        if claim["expect"] in ("increasing", "decreasing", "power") and "reduce" not in claim:
            raise FlowscopeError(f"{where}: expect={claim['expect']!r} needs a reduce")
        if claim["expect"] == "power" and "power" not in claim:
            raise FlowscopeError(f"{where}: expect='power' needs power = EXPONENT")
    elif "reduce" not in claim:
        raise FlowscopeError(f"{where}: below/above/between need a reduce")
    between = claim.get("between")
    if between is not None and not (isinstance(between, list) and len(between) == 2):
        raise FlowscopeError(f"{where}: between must be [low, high], got {between!r}")
