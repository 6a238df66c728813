"""The doctor: verdicts from measurements, with the numbers, the theory and a fix.

Modules, each one job: ``thresholds`` (verdict names, output columns, :class:`Thresholds`),
``table`` (the per-layer table and its roles), ``rules`` (the checks), ``prescribe`` (the
fix text), ``theory_table`` (mean-field predictions beside the measurement), ``render``
(the text), ``diagnosis`` (:class:`Diagnosis`, :func:`diagnose`, :func:`compare`),
``measure`` (running a model: :class:`DeadUnits`, :func:`examine`), ``fixes`` (``reinit``,
``lsuv``).
"""

from flowscope.doctor.diagnosis import Diagnosis, compare, diagnose
from flowscope.doctor.fixes import lsuv, reinit
from flowscope.doctor.measure import DeadUnits, default_loss, examine
from flowscope.doctor.render import format_diagnosis
from flowscope.doctor.thresholds import LAYER_COLUMNS, RUN_COLUMNS, VERDICTS, Thresholds

__all__ = [
    "LAYER_COLUMNS",
    "RUN_COLUMNS",
    "VERDICTS",
    "DeadUnits",
    "Diagnosis",
    "Thresholds",
    "compare",
    "default_loss",
    "diagnose",
    "examine",
    "format_diagnosis",
    "lsuv",
    "reinit",
]
