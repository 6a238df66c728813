"""Figures of signal and gradient flow, drawn from the tidy frames (seaborn + matplotlib).

Every function reads a frame (``stats`` or ``hists`` from :mod:`flowscope.record.frames`), draws
into the ``ax`` (one panel) or ``fig`` (several panels) it is given, or into a new pyplot
figure, and returns the axes. Plots never run models. Given a ``fig`` it drew before, a
function redraws that figure's panels in place (much faster than new axes; see
:func:`clear_panel`, which does the same for an ``ax``).

* :func:`layer_hists` (:func:`activation_hists`, :func:`gradient_hists`): the DD2424
  lecture 4 figures, one histogram per layer (rows of five), x range per layer; activations
  on a linear y axis, gradients on a log y axis; exact zeros left out (non-zero values only)
  where a layer has many of them, with the zero fraction written on the panel (and the
  saturated fraction where a layer saturates). In :mod:`.hists`.
* :func:`scale_plot`: activation std and gradient std per layer on a log axis, one line per
  config (or run), with an optional theory line. In :mod:`.curves`.
* :func:`log_heatmap` / :func:`log_heatmap_steps`: the log-magnitude histograms as a heat map
  over layers, or over steps per layer (fastai's "colorful dimension"). In :mod:`.heat`.
* :func:`saturation_plot`: saturated and zero ("dead") fractions per layer. In :mod:`.curves`.
* :func:`signal_plot`: the signal-propagation plot of a residual model (stream squared mean
  and variance, branch variance, against depth). In :mod:`.signal`.
* :func:`loss_curve` / :func:`layer_steps` / :func:`layer_lines`: a training run over its
  steps, the loss with a min/max envelope, a statistic per layer and step as a heat map, and
  as lines with a min/max band for a few layers, all binned to a fixed number of points. In
  :mod:`.training`.
* :func:`coord_plot`: the μP coordinate check, activation size against width per step. In
  :mod:`.width`.

What they share (:mod:`.common`): which rows and layers a figure shows, the panel grid kept
for a redraw, panel text and ticks. Which layers a figure shows: the activation-function
modules (Tanh, ReLU, ...) when the model has any, since their outputs are the lecture's
"activations at each layer"; otherwise every layer; or the names passed as ``layers``.

Example:
    >>> import flowscope as fs
    >>> rec = fs.load(model_dir)  # records of a Linear/Tanh stack, e.g. "reports/my-model"
    >>> axes = activation_hists(rec.hists, rec.stats)
    >>> [ax.get_title() for ax in axes]  # the Tanh modules
    ['1', '3', '5']
"""

from flowscope.reporter.plots.common import (
    KIND_LABEL,
    clear_panel,
    flow_layers,
    group_column,
    is_activation_type,
    panels,
)
from flowscope.reporter.plots.curves import saturation_plot, scale_plot
from flowscope.reporter.plots.heat import log_heatmap, log_heatmap_steps
from flowscope.reporter.plots.hists import (
    activation_hists,
    gradient_hists,
    hist_figsize,
    layer_hists,
)
from flowscope.reporter.plots.signal import signal_plot
from flowscope.reporter.plots.training import layer_lines, layer_steps, loss_curve
from flowscope.reporter.plots.width import coord_plot

__all__ = [
    "KIND_LABEL",
    "activation_hists",
    "clear_panel",
    "coord_plot",
    "flow_layers",
    "gradient_hists",
    "group_column",
    "hist_figsize",
    "is_activation_type",
    "layer_hists",
    "layer_lines",
    "layer_steps",
    "log_heatmap",
    "log_heatmap_steps",
    "loss_curve",
    "panels",
    "saturation_plot",
    "scale_plot",
    "signal_plot",
]
