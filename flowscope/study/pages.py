"""A study's page: what it sweeps and, for each claim, the quantity measured, the test, who
makes the claim and the theory behind it — written from the study file, so the page cannot
drift from what the engine judges (``docs/studies/NAME.md``; a test keeps them equal).
"""

from __future__ import annotations

from typing import Any

from flowscope.study.spec import Study

__all__ = ["study_page"]

KIND_WORDS = {
    "activation": "the output of each selected module",
    "gradient": "dL/d(output) of each selected module (of a Linear: dL/d pre-activation)",
    "weight": "the weight of each selected module",
    "weight_grad": "dL/dW of each selected module",
}
STAT_WORDS = {
    "mean": "mean",
    "std": "standard deviation",
    "rms": "root mean square",
    "min": "minimum",
    "max": "maximum",
    "absmax": "largest |value|",
    "frac_zero": "share of exact zeros",
    "frac_saturated": "share of saturated values",
    "nan": "count of NaN",
    "inf": "count of ±inf",
}
REDUCE_WORDS = {
    "first": "its first layer's value",
    "last": "its last layer's value",
    "mean": "the mean over the layers",
    "min": "the smallest layer value",
    "max": "the largest layer value",
    "last/first": "last layer / first layer",
    "first/last": "first layer / last layer",
    "gain": "the geometric-mean factor per layer, forward",
    "gain_to_input": "the geometric-mean factor per layer walking back toward the input",
    "spread": "largest / smallest layer value",
    "depth_scale": "the layers over which the series shrinks by e, -(n-1) / log(last/first)",
}
ORIGIN_WORDS = {
    "lecture": "the source",
    "theory": "theory (the note names the paper)",
    "flowscope": "flowscope (a measurement the source implies, not a sentence of it)",
}


def _quantity(claim: dict[str, Any]) -> str:
    source, _, stat = claim["of"].partition(".")
    if source == "probe":
        from flowscope.study.probes import PROBES

        what = f"probe `{stat}`: {PROBES.get(stat).summary}"
    else:
        tensor = f" ({claim['tensor']})" if claim.get("tensor") else ""
        what = f"{STAT_WORDS.get(stat, stat)} of {KIND_WORDS[source]}{tensor}"
    layers = f" over layers `{claim['layers']}`" if claim.get("layers") else " over every layer"
    if claim.get("divide_by"):
        layers += f", each divided by the same over `{claim['divide_by']}`"
    step = f" at step {claim['step']}" if "step" in claim else ""
    return f"{what}{layers}{step}"


def _test(claim: dict[str, Any]) -> str:
    reduced = f"{REDUCE_WORDS[claim['reduce']]}" if claim.get("reduce") else "each layer"
    if claim.get("predicted"):
        reduced = (
            f"({reduced}) / (the same of `{claim['predicted']}`, theory's value for the net"
            " as built)"
        )
    if "expect" in claim:
        return _compared(claim, reduced)
    for key in ("below", "above"):
        if key in claim:
            return f"{reduced} {key} {claim[key]}"
    lo, hi = claim["between"]
    return f"{reduced} between {lo} and {hi}"


def _compared(claim: dict[str, Any], reduced: str) -> str:
    """The words of an ``expect`` test (flowscope.study.claims._expect)."""
    expect, axis, band = claim["expect"], f"`{claim['across']}`", claim.get("band", 1.5)
    if expect in ("same", "differ") and not claim.get("reduce"):
        if expect == "same":
            return f"each layer's largest / smallest value across {axis} at most {band}"
        return f"at the layer where they differ most, largest / smallest across {axis} above {band}"
    if expect == "same":
        return f"{reduced}: largest / smallest across {axis} at most {band}"
    if expect == "differ":
        return f"{reduced}: largest / smallest across {axis} above {band}"
    if expect == "power":
        tol = claim.get("tol", 0.1)
        return f"{reduced}: log-log slope against {axis} within {tol} of {claim['power']}"
    return f"{reduced}: {expect} along {axis}"


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _source_line(src: dict) -> str:
    """The source: a lecture file of the seeds, or a paper (a ``url`` key: its sections)."""
    if "url" in src:
        return f"Source: {src.get('what', '')} (<{src['url']}>, {src.get('lines', '')})."
    return (
        f"Source: {src.get('what', '')} (`../shared/seeds/{src.get('file', '')}`, lines "
        f"{src.get('lines', '')})."
    )


def study_page(study: Study) -> str:
    """Markdown for one study: its sweep, then one section per claim.

    Example:
        >>> from flowscope.study import spec
        >>> page = study_page(spec.load("symmetry"))
        >>> page.splitlines()[0]
        '# Study `symmetry`'
        >>> "### `all-zero-weights-never-change`" in page
        True
    """
    src = study.source
    lines = [
        f"# Study `{study.name}`",
        "",
        "<!-- written by `flowscope study page "
        f"{study.name}` from studies/{study.name}.toml: edit the study file, not this page -->",
        "",
        f"**{study.title}**",
        "",
        study.description.strip(),
        "",
        _source_line(src),
        "",
        "| axis | values |",
        "| --- | --- |",
    ]
    for key, values in study.sweep.items():
        lines.append(f"| `{key}` | {_cell(', '.join(map(str, values)))} |")
    lines.append(f"| seeds | {', '.join(map(str, study.run['seeds']))} |")
    lines += [
        "",
        f"{len(study.configs())} configs. Each claim is judged on every seed and then over the"
        " seeds: held when every seed passes in every setting, not held when every measured"
        " seed fails in some setting, otherwise inconclusive (docs/STUDIES.md, *Verdicts over"
        " seeds*).",
        "",
        "## Claims",
    ]
    for claim in study.claims:
        where = ", ".join(f"{k} = {v}" for k, v in claim.get("where", {}).items()) or "every"
        lines += [
            "",
            f"### `{claim['id']}`",
            "",
            f"> {_cell(claim['text'])}",
            "",
            f"- **Made by:** {ORIGIN_WORDS[claim.get('origin', 'lecture')]}",
            f"- **Configs:** {where}",
            f"- **Measured:** {_quantity(claim)}",
            f"- **Test:** {_test(claim)}",
        ]
        if claim.get("note"):
            lines.append(f"- **Note:** {_cell(claim['note'])}")
    return "\n".join(lines) + "\n"
