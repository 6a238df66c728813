"""The coordinate-check figure (the ``mup`` package's ``plot_coord_data``): one panel per
training step, each layer's activation size against width on log-log axes. Flat lines are
width-stable; lines that rise with width blow up as the model gets wider.

Example:
    >>> import pandas as pd
    >>> sizes = pd.DataFrame({"width": [64, 128, 64, 128], "step": [0, 0, 1, 1],
    ...                       "layer": ["out"] * 4, "size": [1.0, 1.0, 1.0, 2.0]})
    >>> fig = coord_plot(sizes)
    >>> [ax.get_title() for ax in fig.axes]
    ['step 0', 'step 1']
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pandas as pd

from flowscope.core.errors import FlowscopeError
from flowscope.reporter.plots.common import axes_row, spread

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["coord_plot"]


def coord_plot(
    sizes: pd.DataFrame, *, most_layers: int = 10, most_steps: int = 6, fig: Figure | None = None
) -> Figure:
    """Panels for at most ``most_steps`` steps (the first, the last and some between), a line
    per layer for at most ``most_layers`` layers (spread over the depth, the last included),
    from the ``sizes`` frame of :func:`flowscope.doctor.coordcheck.coord_check`."""
    missing = [c for c in ("width", "step", "layer", "size") if c not in sizes.columns]
    if missing:
        raise FlowscopeError(f"coord_plot needs the sizes of coord_check; missing {missing}")
    steps = [int(s) for s in spread([str(s) for s in sorted(sizes.step.unique())], most_steps)]
    layers = spread(list(dict.fromkeys(sizes.layer)), most_layers)
    fig, axes, _ = axes_row(fig, len(steps), (2.6 * len(steps), 2.8), key=("coord",))
    for step, ax in zip(steps, axes, strict=True):
        rows = sizes[sizes.step == step]
        for layer in layers:
            line = rows[rows.layer == layer].sort_values("width")
            ax.plot(line.width, line["size"], marker=".", label=str(layer))
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"step {step}", fontsize=9)
        ax.set_xlabel("width")
    axes[0].set_ylabel("activation rms")
    axes[-1].legend(fontsize=6, title="layer", title_fontsize=6, loc="best")
    if hasattr(fig, "tight_layout"):  # a report's subfigure is laid out by its canvas
        fig.tight_layout()
    return fig
