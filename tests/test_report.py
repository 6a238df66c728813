"""The reporter: report.html from run folders, Records and Recorders; summary, exports, CLI.

The folders are built here to the run-folder contract (a study run: stats/hists with config
columns, meta/spec/claims/configs JSON; an ``fs.watch`` run: stats, hists, meta), from tiny
real recordings, so the page is checked against known configs, names and statuses.
"""

from __future__ import annotations

import base64
import html as markup
import io
import json
import math
import re
import time
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from matplotlib.figure import Figure
from PIL import Image
from torch import nn

import flowscope as fs
from flowscope.cli.report_cmd import report_cmd
from flowscope.core.errors import FlowscopeError
from flowscope.record.frames import Records, write_parquet
from flowscope.reporter.canvas import Canvases, palette_png
from flowscope.reporter.figures import config_figures
from flowscope.reporter.page import REPORT_FILE, fmt, pct, report
from flowscope.reporter.tables import summary

XSS = "<script>window.__xss = 1</script>"
WIDTH = 16
# (activation, init, module, weight std); a fourth config fails before recording
CONFIGS = [
    ("tanh", "small", nn.Tanh, 0.05),
    ("relu", "he", nn.ReLU, math.sqrt(2 / WIDTH)),
    ("tanh", "large", nn.Tanh, 1.5),
]
FAILED = ("relu", "large")


def record(
    act: type[nn.Module] = nn.Tanh,
    std: float = 0.3,
    *,
    depth: int = 3,
    steps: int = 1,
    name: str = "",
    seed: int = 0,
) -> fs.Recorder:
    """A closed recorder of a Linear/act MLP with N(0, std²) weights, zero biases."""
    gen = torch.Generator().manual_seed(seed)
    model = nn.Sequential(*[m for _ in range(depth) for m in (nn.Linear(WIDTH, WIDTH), act())])
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.Linear):
                m.weight.normal_(0.0, std, generator=gen)
                m.bias.zero_()
    x = torch.randn(64, WIDTH, generator=gen)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with fs.watch(model, name=name, bins=16) as rec:
        for _ in range(steps):
            model(x).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            rec.step()
    return rec


def config_id(i: int, activation: str, init: str, seed: int = 0) -> str:
    return f"{i:03d}-activation={activation},init={init},seed={seed}"


def make_study(
    folder: Path,
    *,
    xss: bool = False,
    seeds: tuple[int, ...] = (0,),
    stds: dict[tuple[int, int], float] | None = None,
) -> Path:
    """A study run folder to the contract: 3 recorded settings and 1 failed one, each run
    with every seed (``stds``: another weight std for (setting, seed))."""
    folder.mkdir(parents=True, exist_ok=True)
    stats, hists, statuses = [], [], []
    for i, (activation, init, module, std) in enumerate(CONFIGS):
        for seed in seeds:
            weight_std = (stds or {}).get((i, seed), std)
            rec = record(module, weight_std, seed=i + 100 * seed).records()
            cid = config_id(len(statuses), activation, init, seed)
            columns = {"config": cid, "activation": activation, "init": init, "seed": seed}
            s, h = rec.stats.assign(run=cid, **columns), rec.hists.assign(run=cid, **columns)
            if xss and i == 0:  # a layer name and an axis value from a hostile file
                s["layer"] = s["layer"].replace("1", XSS)
                h["layer"] = h["layer"].replace("1", XSS)
                columns["activation"] = s["activation"] = h["activation"] = f"tanh{XSS}"
            stats.append(s)
            hists.append(h)
            axes = {"activation": columns["activation"], "init": init}
            done = {"status": "done", "error": None}
            statuses.append({"config": cid, "axes": axes, "seed": seed, **done})
    error = "RuntimeError: boom <b>not bold</b>"
    axes = dict(zip(["activation", "init"], FAILED, strict=True))
    for seed in seeds:
        failed = config_id(len(statuses), *FAILED, seed)
        statuses.append(
            {"config": failed, "axes": axes, "seed": seed, "status": "failed", "error": error}
        )
    front = ["config", "activation", "init", "seed"]
    meta = {
        "study": "tiny",
        "title": f"Tiny study {XSS if xss else ''}",
        "source": {"file": "002_2f5fb56b234155bd.txt", "lines": "850-1350", "what": "DD2424"},
        "config_columns": front,
        "flowscope": fs.__version__,
        "torch": torch.__version__,
        "written": time.time(),
    }
    for name, parts in (("stats", stats), ("hists", hists)):
        frame = pd.concat(parts, ignore_index=True)
        frame = frame[front + [c for c in frame.columns if c not in front]]
        write_parquet(frame, folder / f"{name}.parquet", meta)
    spec = {
        "name": "tiny",
        "title": meta["title"],
        "source": meta["source"],
        "net": {"name": "custom"},
        "sweep": {"activation": ["tanh", "relu"], "init": ["small", "he", "large"]},
        "claims": [],
    }
    first = config_id(0, "tanh", "small")
    claims = [
        {"id": "held-one", "text": "tanh small: activations shrink", "held": True,
         "detail": "gain below 0.5", "numbers": {"value": {first: 0.2}, "below": 0.5},
         "where": {"activation": "tanh", "init": "small"}, "note": ""},
        {"id": "not-held-one", "text": f"a claim that fails {XSS if xss else ''}",
         "held": False, "detail": "spread below 2", "numbers": {"value": {first: 3.1},
         "below": 2.0}, "where": {}, "note": "the contrast"},
        {"id": "unmeasured", "text": "nothing matched", "held": None, "detail": "",
         "numbers": {}, "where": {"activation": "sigmoid"}, "note": ""},
    ]  # fmt: skip
    for name, payload in (("meta", meta), ("spec", spec), ("claims", claims)):
        (folder / f"{name}.json").write_text(json.dumps(payload))
    (folder / "configs.json").write_text(json.dumps(statuses))
    return folder


def summary_rows(html: str) -> list[str]:
    body = re.search(r'<table class="summary">.*?<tbody>(.*?)</tbody>', html, re.S)
    assert body, "no summary table"
    return re.findall(r"<tr>.*?</tr>", body.group(1), re.S)


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    folder = make_study(tmp_path_factory.mktemp("study") / "run", xss=True)
    path = report(folder, workers=2)  # the forked path; the browser test takes the serial one
    return path, path.read_text()


def test_study_report_is_written_beside_the_records(study):
    path, html = study
    assert path.name == REPORT_FILE and path.parent.name == "run"
    for name in ("summary.csv", "layers.csv", "stats.csv", "claims.csv"):
        assert (path.parent / name).is_file(), name
    table = pd.read_csv(path.parent / "summary.csv")
    assert len(table) == len(CONFIGS) + 1
    assert table.status.tolist() == ["done"] * len(CONFIGS) + ["failed"]
    assert table.verdict.iloc[: len(CONFIGS)].notna().all()
    assert html.startswith("<!DOCTYPE html>")


def test_summary_has_one_row_per_config_in_study_order(study):
    _, html = study
    rows = summary_rows(html)
    assert len(rows) == len(CONFIGS) + 1
    assert "relu · he" in rows[1] and "failed" in rows[-1]
    assert "Error" not in rows[0] and "RuntimeError: boom" in rows[-1]


def test_claims_are_listed_with_their_outcome(study):
    _, html = study
    claims = html[html.index('id="claims"') :]
    for mark in ("held", "not held", "not measured"):
        assert f">{mark}</span>" in claims
    assert "1 of 3 held" in claims
    assert "below 0.5" in claims  # the test the claim applied
    assert "tanh&lt;script&gt;" in claims  # measured values are labelled by config


def test_every_name_from_a_model_or_a_file_is_escaped(study):
    _, html = study
    assert "<script" not in html.lower()
    assert "<b>not bold</b>" not in html
    assert "&lt;script&gt;window.__xss = 1&lt;/script&gt;" in html
    assert "&lt;b&gt;not bold&lt;/b&gt;" in html


def test_page_loads_nothing_from_the_network(study):
    _, html = study
    assert not re.search(r"<(script|link|iframe|object|embed)\b", html, re.I)
    assert not re.search(r"@import|url\(", html)
    for attr, value in re.findall(r'\b(src|href)="([^"]*)"', html):
        assert value.startswith(("data:image/png;base64,", "#")) or not re.match(
            r"^([a-z][a-z0-9+.-]*:|//)", value
        ), f"{attr}={value[:60]!r} leaves the page"


def test_figures_are_embedded_pngs(study):
    _, html = study
    images = re.findall(r'<img src="data:image/png;base64,([^"]+)"', html)
    # the scale plot, then per recorded config: 3 histogram rows, heat map, saturation plot
    assert len(images) == 1 + 5 * len(CONFIGS)
    for data in images:
        assert base64.b64decode(data)[:8] == b"\x89PNG\r\n\x1a\n"


def test_data_links_are_relative_and_resolve(study):
    path, html = study
    links = [unquote(h) for h in re.findall(r'href="([^"#][^"]*)"', html)]
    assert {"stats.parquet", "hists.parquet", "summary.csv", "claims.csv"} <= set(links)
    for link in links:
        assert (path.parent / link).is_file(), link


def test_report_elsewhere_links_back_to_the_records(tmp_path):
    run = tmp_path / "runs" / "my model"
    record(name="mlp").save(str(run))
    path = report(run, tmp_path / "out")
    html = path.read_text()
    assert path == tmp_path / "out" / REPORT_FILE
    assert 'href="../runs/my%20model/stats.parquet"' in html
    assert (path.parent / "summary.csv").is_file() and not (run / REPORT_FILE).exists()


def test_report_from_recorder_and_records_saves_them_first(tmp_path):
    rec = record(nn.ReLU, name="net")
    path = report(rec, tmp_path / "a")
    assert {p.name for p in path.parent.iterdir()} >= {"stats.parquet", "meta.json", REPORT_FILE}
    assert len(summary_rows(path.read_text())) == 1
    two = pd.concat([rec.stats, record(name="other").stats], ignore_index=True)
    both = Records(stats=two, hists=pd.concat([rec.hists, record(name="other").hists]), meta={})
    html = report(both, tmp_path / "b").read_text()
    rows = summary_rows(html)
    assert len(rows) == 2 and "net" in rows[0] and "other" in rows[1]


def test_default_folder_for_records_is_named_after_the_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = report(record(name="my/model"))
    assert path == Path("reports") / "my-model" / REPORT_FILE


def test_training_run_gets_heat_maps_over_steps(tmp_path):
    rec = record(steps=3, name="train")
    html = report(rec, tmp_path).read_text()
    assert "over training" in html and "log-magnitude heat map" not in html


def test_activations_only_still_make_a_report(tmp_path):
    model = nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.ReLU(), nn.Linear(WIDTH, 2))
    with fs.watch(model, kinds=["activation"], name="fwd") as rec, torch.no_grad():
        model(torch.randn(8, WIDTH))
    html = report(rec, tmp_path).read_text()
    assert len(summary_rows(html)) == 1 and "Activations per layer" in html
    assert len(re.findall(r"<img ", html)) == 4  # scale plot, histograms, heat map, zeros


@pytest.mark.parametrize("bad", [42, None, ["stats.parquet"]])
def test_report_rejects_what_is_not_a_run(bad):
    with pytest.raises(FlowscopeError, match="run folder"):
        report(bad)


def test_report_of_a_missing_folder_says_what_is_missing(tmp_path):
    with pytest.raises(FlowscopeError, match=r"missing stats\.parquet"):
        report(tmp_path)


def test_summary_frame_keeps_failed_configs_in_order(tmp_path):
    folder = make_study(tmp_path / "s")
    stats = fs.load(folder).stats
    configs = json.loads((folder / "configs.json").read_text())
    table = summary(stats, configs=configs)
    assert table.config.tolist() == [c["config"] for c in configs]
    assert table.label.tolist()[:2] == ["tanh · small", "relu · he"]
    assert table.status.tolist()[-1] == "failed" and table.verdict.isna().all()
    assert {"act_gain", "grad_gain", "grad_ratio", "worst_layer", "thresholds"} <= set(table)


SEEDS = (0, 1, 2)


def section_titles(html: str) -> list[str]:
    """Each details section's title, badges left out."""
    return [
        t.strip() for t in re.findall(r'<section class="config" id="cfg-\d+">\s*<h3>([^<]*)<', html)
    ]


@pytest.fixture(scope="module")
def seeded(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    # every setting with 3 seeds; seed 2 of tanh · small gets a healthy std: its seeds disagree
    folder = tmp_path_factory.mktemp("seeds") / "run"
    make_study(folder, seeds=SEEDS, stds={(0, 2): 0.3})
    return folder, report(folder).read_text()


def test_several_seeds_give_a_section_and_a_summary_row_per_setting(seeded):
    folder, html = seeded
    settings = [f"{activation} · {init}" for activation, init, *_ in CONFIGS]
    settings.append(" · ".join(FAILED))
    assert section_titles(html) == settings
    rows = summary_rows(html)
    assert [re.search(r'<a href="#cfg-\d+">([^<]*)</a>', r).group(1) for r in rows] == settings
    assert "Details per setting" in html and f"{len(SEEDS)}</span>seeds each" in html
    # the seeds' verdicts, as summary.csv (one row per config) has them
    table = pd.read_csv(folder / "summary.csv")
    table["outcome"] = table["verdict"].fillna(table["status"])
    for row, (_, part) in zip(rows, table.groupby(["activation", "init"], sort=False), strict=True):
        counts = Counter(part["outcome"]).most_common()
        badges = re.findall(r'<span class="badge [^"]+">([^<]+)</span>', row)
        if len(counts) == 1:
            assert badges == [counts[0][0]] and f"({len(SEEDS)} seeds)" in row
        else:
            assert badges == [f"{v} {n}" for v, n in counts]
        gains = part["act_gain"].dropna()
        if len(gains):  # the median, and the range over the seeds beneath it
            assert f">{fmt(gains.median())}<div" in row
            assert f"{fmt(gains.min())}–{fmt(gains.max())}" in row
    assert re.findall(r'<span class="badge [^"]+">([^<]+)</span>', rows[0]) == [
        "vanishing 2",
        "healthy 1",
    ]


def test_a_setting_shows_the_histograms_of_its_first_seed_and_says_so(seeded):
    folder, html = seeded
    images = re.findall(r'<img src="(data:image/png;base64,[^"]+)"', html)
    assert len(images) == 1 + 5 * len(CONFIGS)  # the scale plot, 5 figures per setting
    rec = fs.load(folder)
    first = config_id(0, "tanh", "small", 0)
    alone = config_figures(
        rec.stats[rec.stats.config == first], rec.hists[rec.hists.config == first]
    )
    for src, figure in zip(images[1:4], alone[:3], strict=True):  # the three histogram rows
        assert np.array_equal(decoded(src), decoded(figure["src"])), figure["title"]
    section = html[html.index('id="cfg-0"') : html.index('id="cfg-1"')]
    assert "Histograms and heat maps: seed 0, the first of the 3." in section
    assert "the median over the seeds; the band around it: their range" in section
    seeds = re.search(r'<table class="seeds">.*?<tbody>(.*?)</tbody>', section, re.S).group(1)
    ids = [config_id(i, "tanh", "small", s) for i, s in enumerate(SEEDS)]
    assert re.findall(r'<td class="mono">([^<]*)</td>', seeds)[::2] == ids  # (config, worst)
    assert "median over the seeds 0, 1, 2" in html  # the scale plot's caption


def test_setting_figures_redrawn_match_new_ones(seeded):
    rec = fs.load(seeded[0])
    kept = Canvases()
    for activation, init, *_ in CONFIGS:
        mine = (rec.stats.activation == activation) & (rec.stats.init == init)
        hists = rec.hists[rec.hists.config == rec.stats[mine].config.iloc[0]]
        again = config_figures(rec.stats[mine], hists, kept, band="seed")
        new = config_figures(rec.stats[mine], hists, Canvases(), band="seed")
        assert [f["title"] for f in again] == [f["title"] for f in new]
        for a, b in zip(again, new, strict=True):
            assert np.array_equal(decoded(a["src"]), decoded(b["src"])), a["title"]


def test_a_seed_that_diverged_is_named_beside_the_verdicts(tmp_path):
    folder = make_study(tmp_path / "run", seeds=(0, 1))
    configs = json.loads((folder / "configs.json").read_text())
    configs[1]["status"] = "diverged"  # tanh · small, seed 1: it has a verdict all the same
    (folder / "configs.json").write_text(json.dumps(configs))
    rows = summary_rows(report(folder).read_text())
    assert '<span class="badge diverged">diverged 1 of 2</span>' in rows[0]
    assert "diverged" not in "".join(rows[1:3])
    # every seed failed: the verdicts say it, once; the same error once for both seeds
    assert re.findall(r'<span class="badge [^"]+">([^<]+)</span>', rows[3]) == ["failed"]
    assert "seeds 0, 1: RuntimeError: boom" in rows[3] and rows[3].count("boom") == 1


def test_one_seed_keeps_a_section_and_a_row_per_config(study):
    path, html = study
    labels = pd.read_csv(path.parent / "summary.csv")["label"].tolist()
    assert section_titles(html) == [markup.escape(label, quote=False) for label in labels]
    assert len(summary_rows(html)) == len(labels) == len(CONFIGS) + 1
    assert "Details per config" in html
    for seeds_only in (
        "Details per setting",
        "seeds each",
        'class="seeds"',
        "median over the seeds",
    ):
        assert seeds_only not in html


def test_cli_writes_the_report_and_reports_errors_cleanly(tmp_path):
    record(name="cli").save(str(tmp_path / "run"))
    ok = CliRunner().invoke(report_cmd, [str(tmp_path / "run"), "--out", str(tmp_path / "r")])
    assert ok.exit_code == 0, ok.output
    assert ok.output.strip() == str(tmp_path / "r" / REPORT_FILE)
    bad = CliRunner().invoke(report_cmd, [str(tmp_path / "nothing")])
    assert bad.exit_code == 1 and bad.output.startswith("Error:") and "missing" in bad.output


def test_numbers_are_formatted_for_reading():
    assert fmt(0.22377) == "0.224" and fmt(7.04e4) == "7.04e+04" and fmt(float("nan")) == "—"
    assert fmt(float("inf")) == "∞" and fmt(3) == "3" and fmt("x") == "x"
    assert pct(0.905) == "90.5%" and pct(None) == "—" and pct(float("nan")) == "—"


def decoded(src: str) -> Any:
    assert src.startswith("data:image/png;base64,")
    with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))) as image:
        return np.asarray(image.convert("RGBA"))


def test_figures_redrawn_for_the_next_config_match_new_ones(tmp_path):
    rec = fs.load(make_study(tmp_path / "s"))
    kept = Canvases()  # every config after the first redraws these figures
    for config in rec.stats["config"].unique():
        stats = rec.stats[rec.stats.config == config]
        hists = rec.hists[rec.hists.config == config]
        again = config_figures(stats, hists, kept)
        new = config_figures(stats, hists, Canvases())
        assert [f["title"] for f in again] == [f["title"] for f in new]
        for a, b in zip(again, new, strict=True):
            assert np.array_equal(decoded(a["src"]), decoded(b["src"])), a["title"]


def test_cropped_figures_are_cut_like_a_tight_bounding_box():
    def draw(fig: Any) -> None:
        ax = fig.subplots()
        ax.plot([0, 1], [0, 1])
        ax.set_xticks([0, 1], ["a long rotated label", "b"], rotation=40, ha="right")

    reference = Figure(figsize=(4, 2), dpi=100)
    draw(reference)
    buf = io.BytesIO()
    reference.savefig(buf, format="png", dpi=100, bbox_inches="tight", pad_inches=0.08)
    tight = Image.open(buf).size
    image = decoded(Canvases().png("line", draw, (4.0, 2.0)))
    assert abs(image.shape[1] - tight[0]) <= 4 and abs(image.shape[0] - tight[1]) <= 4
    assert image.shape[0] > 200  # the labels below the figure are in

    for x in (-0.3, -0.9):  # reaching past the canvas's margin, or wholly beyond it
        fig = Figure(figsize=(4, 2), dpi=100)
        draw(fig)
        fig.text(x, 0.5, "far out")
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100, bbox_inches="tight", pad_inches=0.08)

        def far(fig: Any, x: float = x) -> None:
            draw(fig)
            fig.text(x, 0.5, "far out")

        wide = decoded(Canvases().png("far", far, (4.0, 2.0)))
        assert abs(wide.shape[1] - Image.open(buf).size[0]) <= 4
        assert wide.shape[1] > image.shape[1] + 50  # the text is in


def test_figures_keep_their_colours_in_the_palette():
    rng = np.random.default_rng(0)
    colours = rng.integers(0, 256, (300, 4), dtype=np.uint8)
    colours[:, 3] = 255
    for n in (200, 300):  # exact up to 256 colours, else nearest of the most frequent
        rgba = colours[rng.integers(0, n, (40, 50))]
        with Image.open(io.BytesIO(palette_png(rgba))) as image:
            assert image.mode == "P"
            back = np.asarray(image.convert("RGBA")).reshape(-1, 4)
        pixels = rgba.reshape(-1, 4)
        if n <= 256:
            assert np.array_equal(back, pixels)
            continue
        # the 256 most frequent colours, counted here, are kept exactly (ties may go either
        # way, so only strictly more frequent ones are required); every other pixel takes
        # the kept colour nearest to it
        used, counts = np.unique(pixels, axis=0, return_counts=True)
        palette = np.unique(back, axis=0)
        assert len(palette) <= 256
        assert {tuple(c) for c in palette} <= {tuple(c) for c in used}
        surely = used[counts > np.sort(counts)[-256]]
        assert {tuple(c) for c in surely} <= {tuple(c) for c in palette}
        far = ((pixels[:, None, :3].astype(int) - palette[None, :, :3].astype(int)) ** 2).sum(2)
        got = ((pixels[:, :3].astype(int) - back[:, :3].astype(int)) ** 2).sum(1)
        assert np.array_equal(got, far.min(axis=1))


def test_a_run_whose_gradients_are_all_nan_is_reported_not_fatal(tmp_path):
    # a NaN loss makes every gradient NaN: their linear histograms have no range; the report
    # (and its gradient figure) must still be written, saying so, and the doctor must say why
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with fs.watch(model) as rec:
        (model(torch.randn(8, 4)).sum() * float("nan")).backward()
    grads = rec.stats.query("kind == 'gradient'")
    void = set(grads.loc[grads["nan"] == grads["count"], "layer"])  # the head's, at least
    assert "2" in void
    from flowscope.reporter import plots

    axes = plots.layer_hists(rec.hists, rec.stats, kind="gradient", fig=Figure())
    said = {ax.get_title(): " ".join(t.get_text() for t in ax.texts) for ax in axes}
    assert all(("no finite value" in said[name]) == (name in void) for name in said)
    page = fs.report(rec, tmp_path / "nan").read_text()
    assert "non-finite" in page
