"""The signal-propagation plot (Brock, De & Smith 2021, Fig. 1): the residual stream's average
channel squared mean and average channel variance, and the residual branch's variance,
against depth — three panels, one line per model (``by``), from the frame of
:func:`flowscope.doctor.signal.signal_propagation`.

Example:
    >>> import pandas as pd
    >>> frame = pd.DataFrame({"depth": [0, 1, 2], "block": ["", "0", "1"],
    ...                       "channel_mean_sq": [0.0, 0.3, 0.6], "channel_var": [1.0, 1.7, 2.4],
    ...                       "branch_var": [float("nan"), 0.7, 0.7]})
    >>> fig = signal_plot(frame)
    >>> [ax.get_title() for ax in fig.axes]
    ['average channel squared mean', 'average channel variance', 'residual branch variance']
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pandas as pd

from flowscope.core.errors import FlowscopeError
from flowscope.reporter.plots.common import axes_row, log_y

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["SPP_PANELS", "signal_plot"]

SPP_PANELS = {
    "channel_mean_sq": "average channel squared mean",
    "channel_var": "average channel variance",
    "branch_var": "residual branch variance",
}


def signal_plot(
    frame: pd.DataFrame, *, by: str | None = None, log: bool = False, fig: Figure | None = None
) -> Figure:
    """Three panels against depth, a line per value of ``by`` (one line without it); ``log``
    puts the y axes on a log scale (geometric growth shows as a straight line)."""
    missing = [c for c in ("depth", *SPP_PANELS) if c not in frame.columns]
    if missing:
        raise FlowscopeError(
            f"signal_plot needs the columns of signal_propagation; missing {missing}"
        )
    if by is not None and by not in frame.columns:
        raise FlowscopeError(f"by={by!r} is not a column; allowed: {sorted(frame.columns)}")
    fig, axes, _ = axes_row(fig, len(SPP_PANELS), (11.0, 3.2), key=("signal", by, log))
    groups = frame.groupby(by, sort=False) if by is not None else [("", frame)]
    for (column, title), ax in zip(SPP_PANELS.items(), axes, strict=True):
        for label, rows in groups:
            rows = rows.dropna(subset=[column])
            ax.plot(rows["depth"], rows[column], marker=".", label=str(label) if by else None)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("depth (residual blocks)")
        if log:
            log_y(ax)
    if by is not None:
        axes[-1].legend(fontsize=7, title=by, title_fontsize=7)
    if hasattr(fig, "tight_layout"):  # a report's subfigure is laid out by its canvas
        fig.tight_layout()
    return fig
