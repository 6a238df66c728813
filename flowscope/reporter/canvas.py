"""Figures drawn into PNG data URIs: kept canvases, cropping, a palette PNG encoder.

Example:
    >>> src = figure_png(lambda fig: fig.subplots().plot([1, 3, 2]), (2.0, 1.5))
    >>> src[:22]
    'data:image/png;base64,'
"""

from __future__ import annotations

import base64
import io
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure, SubFigure

__all__ = ["DPI", "MARGIN", "PAD", "Canvases", "figure_png", "palette_png"]

DPI = 100
PAD = 0.08  # inches of white around a figure cropped to its contents
MARGIN = 1.0  # inches of canvas around such a figure, for labels that stick out of it


class Canvases:
    """The report's figures, each built once and then redrawn in place for every config.

    A study draws the same figures for each of its configs, and matplotlib spends most of a
    figure's time on things that do not change between them. So, for one report:

    * each kind of figure (``key``) and size keeps its Figure and canvas; the plotting
      functions empty and redraw its panels (:func:`flowscope.reporter.plots.clear_panel`)
      instead of creating axes and ticks again;
    * a figure cropped to its contents (``tight``) is drawn once, centred on a canvas with a
      margin for labels that stick out, and cut from the pixels (``savefig(bbox_inches=
      "tight")`` draws twice);
    * the pixels go from the canvas straight into a PNG of at most 256 colours.

    Example:
        >>> import flowscope as fs
        >>> from flowscope.reporter import plots
        >>> stats = fs.load(run_dir).stats  # a study run, e.g. "reports/init-scales"
        >>> canvases = Canvases()
        >>> draw = lambda fig: plots.scale_plot(stats, fig=fig)
        >>> canvases.png("scale", draw, (11.0, 4.0))  # doctest: +ELLIPSIS
        'data:image/png;base64,...'
    """

    def __init__(self) -> None:
        self._kept: dict[tuple[Any, ...], tuple[FigureCanvasAgg, Figure | SubFigure]] = {}

    def png(
        self,
        key: Any,
        draw: Callable[[Any], object],
        size: tuple[float, float],
        tight: bool = True,
    ) -> str:
        """``draw(fig)`` on the figure kept for ``key`` and ``size``, as a PNG data URI.

        ``tight=False`` for figures that lay themselves out to their size; else the image is
        cropped to what was drawn plus ``PAD``.
        """
        kept = self._kept.get((key, size, tight))
        if kept is None:
            kept = self._kept[(key, size, tight)] = self._canvas(size, tight)
        canvas, target = kept
        draw(target)
        _fixed_empty_labels(target)
        canvas.draw()
        rgba = np.asarray(canvas.buffer_rgba())
        if tight:
            cropped = None if _placed_outside(canvas, target) else _crop(rgba, round(PAD * DPI))
            if cropped is None:  # something reaches past the margin: let matplotlib measure
                buf = io.BytesIO()
                canvas.figure.savefig(
                    buf, format="png", dpi=DPI, bbox_inches="tight", pad_inches=PAD
                )
                from PIL import Image

                buf.seek(0)
                with Image.open(buf) as image:
                    cropped = np.asarray(image.convert("RGBA"))
            rgba = cropped
        return "data:image/png;base64," + base64.b64encode(palette_png(rgba)).decode("ascii")

    def _canvas(
        self, size: tuple[float, float], tight: bool
    ) -> tuple[FigureCanvasAgg, Figure | SubFigure]:
        """A canvas and what to draw on: its figure, or a subfigure of ``size`` centred on it."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        if not tight:
            fig = Figure(figsize=size, dpi=DPI)
            return FigureCanvasAgg(fig), fig
        (w, h), m = size, MARGIN
        fig = Figure(figsize=(w + 2 * m, h + 2 * m), dpi=DPI)
        spec = fig.add_gridspec(
            3, 3, width_ratios=[m, w, m], height_ratios=[m, h, m],
            left=0, right=1, bottom=0, top=1, wspace=0, hspace=0,
        )  # fmt: skip
        return FigureCanvasAgg(fig), fig.add_subfigure(spec[1, 1])


def _fixed_empty_labels(fig: Figure | SubFigure) -> None:
    """Skip placing axis labels that are empty: matplotlib measures every tick label to do it."""
    for ax in fig.axes:
        for axis, at in ((ax.xaxis, (0.5, -0.1)), (ax.yaxis, (-0.1, 0.5))):
            if not axis.label.get_text():
                axis.set_label_coords(*at)


def _placed_outside(canvas: Any, fig: Figure | SubFigure) -> bool:
    """Whether a legend or figure text lies off the canvas (placed far outside its figure,
    where no pixel of it shows); what axes draw stays within the margin or reaches its edge,
    which :func:`_crop` sees."""
    legends = [ax.get_legend() for ax in fig.axes]
    placed = [*fig.texts, *fig.legends, *(legend for legend in legends if legend is not None)]
    renderer = canvas.get_renderer()
    width, height = canvas.figure.bbox.size
    for artist in placed:
        box = artist.get_window_extent(renderer)
        if box.x0 < 0 or box.y0 < 0 or box.x1 > width or box.y1 > height:
            return True
    return False


def _crop(rgba: np.ndarray, pad: int) -> np.ndarray | None:
    """The image cut to its non-white pixels plus ``pad``; None when they come that close to
    an edge (the figure may reach past the canvas)."""
    ink = rgba.view(np.uint32)[..., 0] != np.uint32(0xFFFFFFFF)
    rows, cols = np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))
    if not rows.size:
        return rgba
    top, bottom, left, right = rows[0] - pad, rows[-1] + pad, cols[0] - pad, cols[-1] + pad
    if top < 0 or left < 0 or bottom >= rgba.shape[0] or right >= rgba.shape[1]:
        return None
    return rgba[top : bottom + 1, left : right + 1]


def figure_png(draw: Callable[[Any], object], size: tuple[float, float], tight: bool = True) -> str:
    """A one-off figure as a PNG data URI (see :class:`Canvases`)."""
    return Canvases().png(None, draw, size, tight)


def palette_png(rgba: np.ndarray) -> bytes:
    """An RGBA image as a PNG of at most 256 colours: a third of the bytes, no visible change.

    Plots use few colours. The pixels' 32-bit values are factorized (a hash pass, ~2 ms);
    with at most 256 distinct ones they are the palette, exactly; with up to 4096, the 256
    most frequent are, and every other colour (antialiased edges) takes its nearest. More
    colours than that get a median cut (~25 ms).
    """
    from PIL import Image

    rgba = np.ascontiguousarray(rgba, dtype=np.uint8)
    h, w = rgba.shape[:2]
    codes, values = pd.factorize(rgba.view(np.uint32).ravel())
    if len(values) > 4096:
        image = Image.frombuffer("RGBA", (w, h), rgba, "raw", "RGBA", 0, 1).convert("RGB")
        small = image.quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    else:
        rgb = np.asarray(values, dtype=np.uint32).view(np.uint8).reshape(-1, 4)[:, :3]
        if len(values) <= 256:
            palette, index = rgb, codes.astype(np.uint8)
        else:
            counts = np.bincount(codes, minlength=len(values))
            kept = np.argsort(-counts, kind="stable")[:256]
            palette = rgb[kept]
            far = rgb[:, None, :].astype(np.int32) - palette[None, :, :].astype(np.int32)
            nearest = (far**2).sum(axis=2).argmin(axis=1).astype(np.uint8)  # kept: itself
            index = nearest[codes]
        small = Image.frombuffer("P", (w, h), index.reshape(h, w), "raw", "P", 0, 1)
        small.putpalette(np.ascontiguousarray(palette).tobytes())
    out = io.BytesIO()
    small.save(out, format="PNG", optimize=False)
    return out.getvalue()
