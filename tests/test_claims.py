"""Claim checks on hand-made frames whose answers are known."""

from __future__ import annotations

import fnmatch
import math

import numpy as np
import pandas as pd
import pytest

from flowscope.study.claims import ClaimFrames, evaluate_one, layer_series, reduce_series


def frame(configs: dict[str, dict], layers: int = 4, stat: str = "std", kind: str = "activation"):
    """A stats-like frame: each config has axes and a per-layer value function."""
    rows = []
    for cid, spec in configs.items():
        for i in range(layers):
            rows.append(
                {
                    "config": cid, **spec["axes"], "seed": spec.get("seed", 0), "step": 0,
                    "call": 0,
                    "layer_idx": i, "layer": f"layers.{i}.act", "kind": kind, "tensor": "",
                    stat: spec["f"](i),
                }
            )  # fmt: skip
    return pd.DataFrame(rows)


NO_PROBES = pd.DataFrame(columns=["config", "probe", "step", "layer", "value"])


@pytest.mark.parametrize(
    ("how", "expected"),
    [
        ("first", 8.0),
        ("last", 1.0),
        ("mean", 3.75),
        ("last/first", 1 / 8),
        ("first/last", 8.0),
        ("gain", 0.5),
        ("gain_to_input", 2.0),
        ("spread", 8.0),
    ],
)
def test_reducers(how, expected):
    assert reduce_series(np.array([8.0, 4.0, 2.0, 1.0]), how) == pytest.approx(expected)


def test_threshold_claim_holds_only_when_every_selected_config_passes():
    stats = frame(
        {
            "a": {"axes": {"act": "tanh"}, "f": lambda i: 0.2**i},
            "b": {"axes": {"act": "tanh"}, "f": lambda i: 0.9**i},
            "c": {"axes": {"act": "relu"}, "f": lambda i: 2.0**i},
        }
    )
    claim = {"id": "x", "text": "t", "of": "activation.std", "reduce": "gain", "below": 0.5}
    v = evaluate_one({**claim, "where": {"act": "tanh"}}, stats, NO_PROBES, ["act"])
    assert v.held is False and v.numbers["value"] == {
        "a": pytest.approx(0.2),
        "b": pytest.approx(0.9),
    }
    assert "fails at b" in v.detail
    v = evaluate_one({**claim, "where": {"act": "tanh"}, "below": 1.0}, stats, NO_PROBES, ["act"])
    assert v.held is True
    v = evaluate_one({**claim, "where": {"act": "gelu"}}, stats, NO_PROBES, ["act"])
    assert v.held is None and "no measured layer" in v.detail


def test_layers_glob_and_step_selection():
    stats = frame({"a": {"axes": {"act": "tanh"}, "f": lambda i: float(i + 1)}})
    later = stats.assign(step=3, std=stats["std"] * 10)
    both = pd.concat([stats, later], ignore_index=True)
    claim = {"id": "x", "text": "t", "of": "activation.std", "reduce": "max", "below": 100}
    v = evaluate_one({**claim, "layers": "layers.[01].act"}, both, NO_PROBES, ["act"])
    assert v.numbers["value"]["a"] == 20.0  # the last step (3) by default, layers 0-1 only
    v = evaluate_one({**claim, "layers": "layers.[01].act", "step": 0}, both, NO_PROBES, ["act"])
    assert v.numbers["value"]["a"] == 2.0


def test_across_same_differ_monotone_power():
    stats = frame(
        {
            f"c{s}-{n}": {
                "axes": {"sigma": s, "norm": n},
                "f": (lambda i, s=s, n=n: 1.0 if n else s),
            }
            for s in (0.1, 1.0, 10.0)
            for n in (True, False)
        }
    )
    base = {"id": "x", "text": "t", "of": "activation.std", "across": "sigma"}
    same = evaluate_one({**base, "where": {"norm": True}, "expect": "same", "band": 1.01},
                        stats, NO_PROBES, ["sigma", "norm"])  # fmt: skip
    assert same.held is True
    differ = evaluate_one({**base, "where": {"norm": False}, "expect": "differ", "band": 50},
                          stats, NO_PROBES, ["sigma", "norm"])  # fmt: skip
    assert differ.held is True and differ.numbers["value"]["all"] == pytest.approx(100)
    rising = {**base, "where": {"norm": False}, "expect": "increasing", "reduce": "mean"}
    mono = evaluate_one(rising, stats, NO_PROBES, ["sigma", "norm"])
    assert mono.held is True
    # each point along the axis has its interval (one seed here: low = high = the value)
    assert mono.numbers["interval"] == {
        f"sigma={s}": [pytest.approx(s), pytest.approx(s)] for s in (0.1, 1.0, 10.0)
    }
    power = evaluate_one(
        {**base, "where": {"norm": False}, "expect": "power", "reduce": "mean", "power": 1.0},
        stats, NO_PROBES, ["sigma", "norm"],
    )  # fmt: skip
    assert power.held is True and power.numbers["value"]["all"] == pytest.approx(1.0)
    both = evaluate_one(
        {**base, "expect": "same", "band": 1.01}, stats, NO_PROBES, ["sigma", "norm"]
    )
    assert both.held is False  # grouped by norm: the no-norm group varies 100x
    assert set(both.numbers["value"]) == {"norm=True", "norm=False"}


def test_probe_claims():
    probes = pd.DataFrame(
        {
            "config": ["a"] * 4, "act": ["relu"] * 4, "seed": [0] * 4,
            "probe": ["distinct_units"] * 2 + ["param_change"] * 2, "step": [5, 5, 0, 5],
            "layer": ["layers.0.linear", "head", "head.bias", "head.bias"],
            "value": [1.0, 4.0, 0.0, 0.3],
        }
    )  # fmt: skip
    stats = frame({"a": {"axes": {"act": "relu"}, "f": lambda i: 1.0}})
    claim = {"id": "x", "text": "t", "of": "probe.distinct_units", "layers": "layers.0.*",
             "reduce": "max", "below": 1.5}  # fmt: skip
    assert evaluate_one(claim, stats, probes, ["act"]).held is True
    change = {"id": "y", "text": "t", "of": "probe.param_change", "reduce": "max", "above": 0.1}
    assert evaluate_one(change, stats, probes, ["act"]).held is True
    assert evaluate_one({**change, "step": 0}, stats, probes, ["act"]).held is False


def test_a_seed_with_no_finite_value_is_not_measured_and_keeps_the_claim_from_holding():
    # a NaN statistic (no finite value in the tensor) or probe (an undefined share) says
    # nothing about the claim: never a pass, never a silent fail, and named in the verdict
    claim = {"id": "x", "text": "t", "of": "activation.std", "reduce": "mean", "below": 1.0}
    nan = frame({"a": {"axes": {"act": "tanh"}, "f": lambda i: math.nan}})
    v = evaluate_one(claim, nan, NO_PROBES, ["act"])
    assert (v.status, v.held) == ("not measured", None)
    assert v.numbers["unmeasured"] == ["a"] and "(no finite value) at a" in v.detail
    gains = {"tanh": [0.5, math.nan, 0.5]}  # two seeds pass, one is undefined
    some = evaluate_one(claim, seeded(gains), NO_PROBES, ["act"])
    assert (some.status, some.held) == ("inconclusive", None)
    mean = np.mean(0.5 ** np.arange(4))  # the std of layer i is gain**i
    assert some.numbers["interval"] == {"all": [pytest.approx(mean), pytest.approx(mean)]}
    fails = evaluate_one({**claim, "below": 0.1}, seeded(gains), NO_PROBES, ["act"])
    assert (fails.status, fails.held) == ("not held", False)  # every measured seed fails


def _masked_series(claim, stats, probes):
    """The claim's rows by masking the whole frame (how claims were selected before the
    frames were grouped once): the reference for ``layer_series``."""
    source, _, stat = claim["of"].partition(".")
    if source == "probe":
        frame = probes[probes["probe"] == stat]
        step = claim.get("step", frame.groupby("config")["step"].transform("max"))
        frame = frame[frame["step"] == step]
        frame = frame.assign(layer_idx=range(len(frame)))
    else:
        tensor = claim.get("tensor", "weight" if source.startswith("weight") else "")
        frame = stats[(stats.kind == source) & (stats.tensor == tensor) & (stats.call == 0)]
        step = claim.get("step", frame.groupby("config")["step"].transform("max"))
        frame = frame[frame["step"] == step].rename(columns={stat: "value"})
    glob = claim.get("layers")
    picked = [glob is None or fnmatch.fnmatchcase(n, glob) for n in frame["layer"]]
    frame = frame[np.array(picked, dtype=bool)]  # (a plain [] would select no columns)
    for column, wanted in claim.get("where", {}).items():
        frame = frame[frame[column].isin(wanted if isinstance(wanted, list) else [wanted])]
    return frame.sort_values(["config", "layer_idx"], kind="stable")


def test_grouped_selection_gives_the_rows_of_a_mask_over_the_whole_frame():
    rng = np.random.default_rng(0)
    rows = []
    for c, (act, seed) in enumerate([("relu", 0), ("tanh", 0), ("relu", 1), ("tanh", 1)]):
        last = 2 + c % 2  # configs end at different steps
        for step in range(last + 1):
            for i in range(5):
                for kind, tensor in [("activation", ""), ("gradient", ""), ("weight", "weight"),
                                     ("weight", "bias"), ("weight_grad", "weight")]:  # fmt: skip
                    for call in (0, 1):
                        rows.append(
                            {
                                "config": f"{c:03d}-{act}", "act": act, "seed": seed,
                                "step": step, "layer_idx": i, "layer": f"layers.{i}.act",
                                "kind": kind, "call": call, "tensor": tensor,
                                "std": rng.random(), "mean": rng.random(),
                            }
                        )  # fmt: skip
    stats = pd.DataFrame(rows).sample(frac=1.0, random_state=1)  # rows in no particular order
    stats.index = rng.permutation(len(stats)) + 100  # labels that are not positions
    probes = pd.DataFrame(
        [
            {
                "config": f"{c:03d}-x",
                "act": act,
                "seed": 0,
                "probe": probe,
                "step": step,
                "layer": f"layers.{i}.act",
                "value": rng.random(),
            }
            for c, act in enumerate(["tanh", "relu", "tanh"])
            for probe in ("dead_units", "param_change")
            for step in (0, 3)
            for i in (2, 0, 1)  # probe rows in the order they came, not sorted by name
        ]
    )
    claims = [
        {"of": "activation.std"},
        {"of": "activation.std", "layers": "layers.[13].act", "where": {"act": "tanh"}},
        {"of": "gradient.mean", "step": 1, "where": {"seed": [1], "act": ["relu", "tanh"]}},
        {"of": "weight.std"},
        {"of": "weight.std", "tensor": "bias", "step": 2},
        {"of": "weight_grad.std", "where": {"act": "gelu"}},
        {"of": "activation.std", "step": 7},
        {"of": "probe.dead_units", "layers": "layers.[01].act"},
        {"of": "probe.param_change", "step": 0, "where": {"act": "tanh"}},
        {"of": "probe.distinct_units"},
    ]
    index = ClaimFrames(stats, probes)
    for claim in claims:
        want = _masked_series(claim, stats, probes)
        got = index.series(claim, where=claim.get("where", {}))
        assert len(got) == len(want), claim
        pd.testing.assert_frame_equal(got, want[got.columns], obj=str(claim))
        if "where" not in claim:
            pd.testing.assert_frame_equal(layer_series(claim, stats, probes), got)


def test_a_claim_on_nothing_recorded_is_not_measured_rather_than_an_error():
    # a kind that was not recorded, or a step that was not: held None, with the reason (this
    # used to raise KeyError('config') from sorting a frame whose columns were gone)
    stats = frame({"a": {"axes": {"act": "tanh"}, "f": lambda i: 1.0}})
    claim = {"id": "x", "text": "t", "of": "activation.std", "reduce": "max", "below": 2.0}
    for other in ({"of": "gradient.std"}, {"step": 7}, {"layers": "head"}):
        v = evaluate_one({**claim, **other}, stats, NO_PROBES, ["act"])
        assert v.held is None and "no measured layer" in v.detail, other


def seeded(values: dict[str, list[float]], kind: str = "activation") -> pd.DataFrame:
    """A frame of settings (axis ``act``) x seeds whose per-layer std has a known gain."""
    return frame(
        {
            f"{act}-s{seed}": {"axes": {"act": act}, "seed": seed, "f": lambda i, g=g: g**i}
            for act, gains in values.items()
            for seed, g in enumerate(gains)
        },
        kind=kind,
    )


def test_a_claim_is_held_or_not_only_when_every_seed_agrees():
    claim = {"id": "x", "text": "t", "of": "activation.std", "reduce": "gain", "below": 0.5}
    held = evaluate_one(claim, seeded({"tanh": [0.2, 0.3, 0.4]}), NO_PROBES, ["act"])
    assert (held.status, held.held) == ("held", True)
    assert held.numbers["seeds"] == 3
    assert held.numbers["interval"] == {"all": [pytest.approx(0.2), pytest.approx(0.4)]}
    knife = evaluate_one(claim, seeded({"tanh": [0.45, 0.49, 0.52]}), NO_PROBES, ["act"])
    assert (knife.status, knife.held) == ("inconclusive", None)  # the seeds straddle 0.5
    # one setting failing on every seed makes it not held, whatever the other's seeds say
    both = seeded({"tanh": [0.45, 0.49, 0.52], "relu": [0.9, 0.8, 0.7]})
    v = evaluate_one(claim, both, NO_PROBES, ["act"])
    assert (v.status, v.held) == ("not held", False)
    assert v.numbers["interval"]["act=relu"] == [pytest.approx(0.7), pytest.approx(0.9)]


def test_an_across_claim_is_judged_per_seed_and_then_over_the_seeds():
    rows = []
    for seed, (a, b) in enumerate([(1.0, 3.0), (1.0, 3.0), (1.0, 1.2)]):  # seed 2: not differ
        for act, g in (("tanh", a), ("relu", b)):
            rows.append(
                {f"{act}-s{seed}": {"axes": {"act": act}, "seed": seed, "f": lambda i, g=g: g}}
            )
    stats = frame({k: v for r in rows for k, v in r.items()})
    claim = {"id": "x", "text": "t", "of": "activation.std", "across": "act", "expect": "differ",
             "band": 2.0}  # fmt: skip
    v = evaluate_one(claim, stats, NO_PROBES, ["act"])
    assert (v.status, v.held) == ("inconclusive", None)
    assert v.numbers["interval"]["all"] == [pytest.approx(1.2), pytest.approx(3.0)]
    assert set(v.numbers["value"]) == {"all,seed=0", "all,seed=1", "all,seed=2"}
