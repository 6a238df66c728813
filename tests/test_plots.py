"""Figure functions on small frames: panels, scales, labels, the zero-fraction text.

The frames come from tiny real recordings (a Linear/Tanh or Linear/ReLU stack) so that the
numbers the plots show can be checked against the stats frame.
"""

from __future__ import annotations

import io
import math
import subprocess
import sys

import matplotlib
import numpy as np
import pandas as pd
import pytest
from matplotlib.collections import PolyCollection
from matplotlib.figure import Figure
from test_report import record
from torch import nn

from flowscope.core.errors import FlowscopeError
from flowscope.reporter import plots
from flowscope.reporter.plots.common import first_call

matplotlib.use("Agg")


@pytest.fixture(scope="module")
def relu():
    return record(nn.ReLU, math.sqrt(2 / 16), depth=4, name="relu")


@pytest.fixture(scope="module")
def tanh():
    return record(nn.Tanh, 1.5, depth=3, name="tanh")


def panel_texts(ax) -> list[str]:
    return [t.get_text() for t in ax.texts]


def test_activation_row_has_a_panel_per_activation_layer_with_its_own_range(tanh):
    axes = plots.activation_hists(tanh.hists, tanh.stats, fig=Figure())
    acts = tanh.stats.query("kind == 'activation' and module_type == 'Tanh'")
    assert [a.get_title() for a in axes] == acts.layer.tolist() == ["1", "3", "5"]
    assert all(a.get_yscale() == "linear" for a in axes)
    assert (
        axes[0].get_ylabel() == "count"
        and "activations per layer" in axes[0].figure.texts[0].get_text()
    )
    for ax, (_, row) in zip(axes, acts.iterrows(), strict=True):
        lo, hi = ax.get_xlim()  # the layer's own [min, max] (plus matplotlib's margin)
        assert lo <= row["min"] < row["max"] <= hi and hi - lo < 1.2 * (row["max"] - row["min"])
        # tanh has no exact zeros to leave out; sigma 1.5 saturates it
        assert panel_texts(ax) == [f"saturated: {row['frac_saturated']:.1%}"]


def test_relu_panels_show_non_zero_values_and_state_the_zero_fraction(relu):
    axes = plots.layer_hists(relu.hists, relu.stats, kind="activation", fig=Figure())
    acts = relu.stats.query("kind == 'activation' and module_type == 'ReLU'").set_index("layer")
    assert len(axes) == 4
    for ax in axes:
        frac = acts.loc[ax.get_title(), "frac_zero"]
        assert panel_texts(ax) == [f"zero: {frac:.1%}"]
        drawn = ax.patches[0].get_data().values.sum()  # one step patch per panel
        count = acts.loc[ax.get_title(), "count"]
        assert drawn == pytest.approx(count * (1 - frac))  # exactly the non-zero values


def test_gradient_row_is_log_scaled_and_can_keep_or_drop_zeros(relu):
    axes = plots.gradient_hists(relu.hists, relu.stats, fig=Figure())
    assert all(a.get_yscale() == "log" for a in axes) and axes[0].get_ylabel() == "count (log)"
    grads = relu.stats.query("kind == 'gradient'").set_index("layer")
    pre = relu.stats.query("kind == 'gradient' and module_type == 'Linear'").layer.tolist()
    kept = plots.layer_hists(relu.hists, kind="gradient", layers=pre, nonzero=False, fig=Figure())
    dropped = plots.layer_hists(relu.hists, kind="gradient", layers=pre, nonzero=True, fig=Figure())
    for k, d in zip(kept, dropped, strict=True):
        total = grads.loc[k.get_title(), "count"]
        zeros = grads.loc[k.get_title(), "frac_zero"] * total
        assert zeros > 0 and panel_texts(k) == []
        assert k.patches[0].get_data().values.sum() == pytest.approx(total)
        assert d.patches[0].get_data().values.sum() == pytest.approx(total - zeros)


def test_weight_gradients_use_the_weight_not_the_bias(tanh):
    axes = plots.layer_hists(tanh.hists, kind="weight_grad", fig=Figure())
    assert [a.get_title() for a in axes] == ["0", "2", "4"] and axes[0].get_yscale() == "log"
    weights = tanh.stats.query("kind == 'weight_grad' and tensor == 'weight'").set_index("layer")
    drawn = axes[0].patches[0].get_data().values.sum()
    assert drawn == weights.loc["0", "count"] * (1 - weights.loc["0", "frac_zero"])


def test_many_layers_are_spread_keeping_first_and_last(relu):
    names = plots.flow_layers(relu.stats.query("kind == 'gradient'"))
    axes = plots.layer_hists(relu.hists, kind="gradient", max_panels=3, fig=Figure())
    assert [a.get_title() for a in axes] == [names[0], names[2], names[3]]
    assert len(plots.layer_hists(relu.hists, layers=["1"], fig=Figure())) == 1


def test_histograms_refuse_several_configs_unknown_steps_and_layers(relu, tanh):
    both = pd.concat([relu.hists, tanh.hists])
    with pytest.raises(
        FlowscopeError, match=r"one run at a time; the frame has 2 \('relu', 'tanh'\)"
    ):
        plots.activation_hists(both, fig=Figure())
    with pytest.raises(FlowscopeError, match=r"step 7 was not recorded; recorded steps: \[0\]"):
        plots.activation_hists(relu.hists, step=7, fig=Figure())
    with pytest.raises(FlowscopeError, match="layers \\['nope'\\] not in the frame"):
        plots.activation_hists(relu.hists, layers=["nope"], fig=Figure())
    with pytest.raises(FlowscopeError, match=r"no 'weights' rows .*kinds there: \['activation'"):
        plots.layer_hists(relu.hists, kind="weights", fig=Figure())


def test_scale_plot_draws_one_line_per_config_on_log_axes(relu, tanh):
    stats = pd.concat([relu.stats, tanh.stats], ignore_index=True)
    theory = pd.DataFrame(
        {"run": "tanh", "layer": ["1", "3", "5"], "kind": "activation", "std": [0.9, 0.9, 0.9]}
    )
    labels = {"relu": "ReLU, He", "tanh": "tanh, σ=1.5"}
    axes = plots.scale_plot(stats, theory=theory, labels=labels, fig=Figure())
    assert len(axes) == 2 and all(a.get_yscale() == "log" for a in axes)
    solid = [ln for ln in axes[0].lines if ln.get_linestyle() == "-"]
    dashed = [ln for ln in axes[0].lines if ln.get_linestyle() == "--"]
    assert [ln.get_label() for ln in solid] == ["ReLU, He", "tanh, σ=1.5"] and len(dashed) == 1
    assert len(axes[1].lines) == 2  # gradients: no theory given
    tanh_act = tanh.stats.query("kind == 'activation' and module_type == 'Tanh'")["std"]
    assert solid[1].get_ydata() == pytest.approx(tanh_act.to_numpy())
    legend = axes[0].figure.legends[0]
    assert [t.get_text() for t in legend.get_texts()] == [*labels.values(), "theory"]


def test_scale_plot_groups_by_config_when_there_is_one(relu, tanh):
    stats = pd.concat([relu.stats.assign(config="a"), tanh.stats.assign(config="b")])
    axes = plots.scale_plot(stats, fig=Figure())
    assert [ln.get_label() for ln in axes[1].lines] == ["a", "b"]
    assert axes[0].figure.legends[0].get_title().get_text() == "config"


@pytest.fixture(scope="module")
def seeds() -> pd.DataFrame:
    """Stats of two settings (ReLU He, tanh sigma 0.5), 3 seeds each, as a study has them."""
    parts = []
    for name, module, std in (("relu", nn.ReLU, math.sqrt(2 / 16)), ("tanh", nn.Tanh, 0.5)):
        for seed in range(3):
            config = f"{name},seed={seed}"
            stats = record(module, std, depth=4, seed=seed, name=config).stats
            parts.append(stats.assign(config=config, setting=name, seed=seed))
    return pd.concat(parts, ignore_index=True)


def band_edges(band: PolyCollection, xs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The lowest and highest y of a fill_between polygon at each x."""
    points = band.get_paths()[0].vertices
    low = np.array([points[points[:, 0] == x, 1].min() for x in xs])
    high = np.array([points[points[:, 0] == x, 1].max() for x in xs])
    return low, high


def test_scale_plot_bands_the_seeds_of_each_setting(seeds):
    axes = plots.scale_plot(seeds, by="setting", band="seed", fig=Figure())
    for ax, kind in zip(axes, ("activation", "gradient"), strict=True):
        assert [ln.get_label() for ln in ax.lines] == ["relu", "tanh"]  # one line per setting
        bands = [c for c in ax.collections if isinstance(c, PolyCollection)]
        assert len(bands) == 2
        for line, band, name in zip(ax.lines, bands, ("relu", "tanh"), strict=True):
            assert band.get_facecolor()[0][:3] == pytest.approx(
                matplotlib.colors.to_rgb(line.get_color())
            )
            # per layer (execution order), the std over the seeds, from the frame
            mine = first_call(seeds[(seeds.setting == name) & (seeds.kind == kind)])
            layers = plots.flow_layers(mine)
            per_seed = mine[mine.layer.isin(layers)].pivot(
                index="layer", columns="seed", values="std"
            )
            per_seed = per_seed.loc[layers]
            xs = np.arange(1, len(layers) + 1)
            assert line.get_xdata() == pytest.approx(xs)
            assert line.get_ydata() == pytest.approx(per_seed.median(axis=1).to_numpy())
            low, high = band_edges(band, xs)
            assert low == pytest.approx(per_seed.min(axis=1).to_numpy())
            assert high == pytest.approx(per_seed.max(axis=1).to_numpy())
            assert (per_seed.max(axis=1) > per_seed.min(axis=1)).all()  # the seeds differ
    legend = [t.get_text() for t in axes[0].figure.legends[0].get_texts()]
    assert legend == ["relu", "tanh", "min–max over seeds"]


def test_without_a_band_or_with_one_seed_a_line_has_no_band(seeds):
    one = seeds[seeds.seed == 0]
    for frame, kw in ((one, {"by": "setting", "band": "seed"}), (one, {}), (seeds, {})):
        axes = plots.scale_plot(frame, fig=Figure(), **kw)
        assert not axes[0].collections
        assert "min–max over seeds" not in [
            t.get_text() for t in axes[0].figure.legends[0].get_texts()
        ]


def test_a_band_over_several_configs_of_one_seed_is_refused(seeds):
    with pytest.raises(FlowscopeError, match=r"seed=0 holds 2 configs; .* pass it as by"):
        plots.scale_plot(seeds.assign(setting="all"), by="setting", band="seed", fig=Figure())
    with pytest.raises(FlowscopeError, match=r"seed=0 holds 2 configs; .*filter it"):
        plots.saturation_plot(seeds, band="seed", ax=Figure().subplots())
    with pytest.raises(FlowscopeError, match="column 'nope' not in the stats frame"):
        plots.scale_plot(seeds, by="setting", band="nope", fig=Figure())


def test_saturation_plot_bands_the_seeds_of_one_setting(seeds):
    relu = seeds[seeds.setting == "relu"]
    ax = plots.saturation_plot(relu, band="seed", ax=Figure().subplots())
    assert [ln.get_label() for ln in ax.lines] == ["zero (activations)", "zero (gradients)"]
    assert len(ax.collections) == 2 and "3 seeds: median, range" in ax.get_title()
    acts = relu.query("kind == 'activation' and module_type == 'ReLU'")
    per_seed = acts.pivot(index="layer", columns="seed", values="frac_zero").loc[
        ["1", "3", "5", "7"]
    ]
    assert ax.lines[0].get_ydata() == pytest.approx(per_seed.median(axis=1).to_numpy())
    low, high = band_edges(ax.collections[0], np.arange(4))
    assert low == pytest.approx(per_seed.min(axis=1).to_numpy())
    assert high == pytest.approx(per_seed.max(axis=1).to_numpy())


def test_log_heatmap_columns_are_layers_and_fractions_sum_to_one(relu):
    ax = plots.log_heatmap(relu.hists, kind="activation", ax=Figure().subplots())
    names = [t.get_text() for t in ax.get_xticklabels()]
    assert names == ["1", "3", "5", "7"]
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels[0] == "0" and all(t.startswith("1e") for t in labels[1:])
    data = ax.collections[0].get_array()
    assert np.ma.filled(data, 0).reshape(-1, len(names)).sum(axis=0) == pytest.approx(1.0)
    zero_row = np.ma.filled(data, 0).reshape(-1, len(names))[0]
    fracs = relu.stats.query("kind == 'activation' and module_type == 'ReLU'")["frac_zero"]
    assert zero_row == pytest.approx(fracs.to_numpy())  # the bottom row is the exact zeros


def test_log_heatmap_over_steps_has_a_panel_per_layer():
    rec = record(nn.Tanh, 0.5, depth=3, steps=4, name="train")
    axes = plots.log_heatmap_steps(rec.hists, kind="gradient", fig=Figure())
    assert [a.get_title() for a in axes] == ["1", "3", "5"]
    assert [t.get_text() for t in axes[0].get_xticklabels()] == ["0", "1", "2", "3"]
    assert axes[0].get_xlabel() == "step" and axes[1].get_yticklabels()[0].get_text() == ""


def test_saturation_plot_shows_saturated_and_zero_fractions(tanh, relu):
    ax = plots.saturation_plot(tanh.stats, ax=Figure().subplots())
    labels = [ln.get_label() for ln in ax.lines]
    assert labels == ["saturated (activations)", "zero (activations)", "zero (gradients)"]
    sat = tanh.stats.query("kind == 'activation' and module_type == 'Tanh'")["frac_saturated"]
    assert ax.lines[0].get_ydata() == pytest.approx(sat.to_numpy()) and sat.max() > 0.3
    assert ax.get_ylim()[0] < 0 < 1 < ax.get_ylim()[1]
    relu_labels = [ln.get_label() for ln in plots.saturation_plot(relu.stats).lines]
    assert "saturated (activations)" not in relu_labels  # ReLU has no saturation interval


def test_non_finite_values_get_their_own_line(relu):
    stats = relu.stats.copy()
    stats.loc[(stats.kind == "gradient") & (stats.layer == "3"), "nan"] = 5
    labels = [ln.get_label() for ln in plots.saturation_plot(stats, ax=Figure().subplots()).lines]
    assert "non-finite (gradients)" in labels


def test_dollar_signs_in_names_do_not_start_mathtext(relu):
    hists = relu.hists.assign(layer=relu.hists.layer.replace("1", "cost$ $x^2$"))
    fig = Figure()
    axes = plots.activation_hists(hists, fig=fig)
    fig.savefig(io.BytesIO(), format="png")  # would raise on unbalanced mathtext
    assert axes[0].get_title() == r"cost\$ \$x^2\$"


def test_group_column_and_layer_selection():
    frame = pd.DataFrame(
        {
            "run": "r",
            "layer": ["fc", "act", "head"],
            "layer_idx": [0, 1, 2],
            "module_type": ["Linear", "GELU", "Linear"],
        }
    )
    assert plots.group_column(frame) == "run" and plots.flow_layers(frame) == ["act"]
    hf = frame.assign(module_type=["Conv1D", "NewGELUActivation", "Linear"])  # transformers
    assert plots.flow_layers(hf) == ["act"]
    no_acts = frame.assign(module_type="Linear")
    assert plots.flow_layers(no_acts) == ["fc", "act", "head"]


def test_plots_and_the_report_command_do_not_import_torch():
    # flowscope --help registers report_cmd, so importing it must stay light
    code = "import flowscope.reporter.plots, flowscope.cli.report_cmd, sys\n"
    code += "print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def pixels(fig: Figure) -> np.ndarray:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba()).copy()


def test_drawing_again_on_a_figure_reuses_its_panels_and_looks_like_a_new_one(relu, tanh):
    # the report redraws one figure per kind for every config: same axes, same pixels
    runs = [record(nn.Tanh, 0.5, depth=3, steps=3, name=n, seed=i) for i, n in enumerate("ab")]
    small = record(nn.Tanh, 0.2, depth=3, name="small", seed=3)  # as many layers as tanh
    cases = [
        (plots.layer_hists, [tanh.hists, small.hists, tanh.hists], {"kind": "gradient"}),
        (plots.log_heatmap_steps, [r.hists for r in runs], {"kind": "activation"}),
        (plots.scale_plot, [pd.concat([relu.stats, tanh.stats]), relu.stats], {}),
    ]
    banded = record(nn.ReLU, 0.5, depth=4, name="other").stats.assign(setting="b", seed=0)
    banded = pd.concat([banded, banded.assign(seed=1, std=banded["std"] * 3)])
    frames = [pd.concat([relu.stats.assign(setting="a", seed=0), banded]), banded]
    cases.append((plots.scale_plot, frames, {"by": "setting", "band": "seed"}))
    for draw, frames, kw in cases:
        fig = Figure(figsize=(8, 3))
        first = draw(frames[0], fig=fig, **kw)
        count = (len(fig.axes), len(fig.legends))
        for frame in frames[1:]:
            again = draw(frame, fig=fig, **kw)
            new = Figure(figsize=(8, 3))
            draw(frame, fig=new, **kw)
            assert (len(fig.axes), len(fig.legends)) == count  # no second grid, colorbar, legend
            assert all(a is b for a, b in zip(again, first, strict=True)), draw.__name__
            assert np.array_equal(pixels(fig), pixels(new)), draw.__name__


def test_a_figure_drawn_with_other_panels_is_cleared_first(relu):
    fig = Figure()
    plots.layer_hists(relu.hists, kind="gradient", fig=fig)  # log y
    axes = plots.layer_hists(relu.hists, kind="activation", layers=["1", "3"], fig=fig)
    assert len(fig.axes) == 2 and all(a.get_yscale() == "linear" for a in axes)
    new = Figure()
    plots.layer_hists(relu.hists, kind="activation", layers=["1", "3"], fig=new)
    assert np.array_equal(pixels(fig), pixels(new))


def test_clear_panel_empties_a_panel_for_its_function_to_draw_again(tanh):
    ax = Figure().subplots()
    plots.saturation_plot(tanh.stats, ax=ax)
    assert plots.clear_panel(ax) is ax
    assert not (ax.lines or ax.texts or ax.patches or ax.get_legend() or ax.get_title())
    plots.saturation_plot(tanh.stats, ax=ax)
    assert len(ax.lines) == 3 and ax.get_legend() is not None


def test_first_call_keeps_each_layers_first_call_and_first_output():
    frame = pd.DataFrame(
        {
            "step": [0, 0, 0, 0, 0, 0, 1, 1],
            "layer": ["a", "a", "a", "a", "b", "b", "a", "a"],
            "call": [1, 1, 0, 0, 0, 0, 2, 2],
            "tensor": ["", "", "bias", "weight", "1", "0", "1", "0"],
            "v": range(8),
        }
    )
    kept = first_call(frame)
    # step 0 / a: call 0, weight before bias; b: tensor "0" before "1"; step 1 / a: "0"
    assert kept["v"].tolist() == [3, 5, 7] and kept.index.tolist() == [0, 1, 2]
