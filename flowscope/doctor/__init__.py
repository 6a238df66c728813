"""The doctor: verdicts from measurements, with the numbers, the theory and a fix."""

from flowscope.doctor.fixes import lsuv, reinit
from flowscope.doctor.verdicts import (
    DeadUnits,
    Diagnosis,
    Thresholds,
    compare,
    diagnose,
    examine,
    format_diagnosis,
)

__all__ = [
    "DeadUnits",
    "Diagnosis",
    "Thresholds",
    "compare",
    "diagnose",
    "examine",
    "format_diagnosis",
    "lsuv",
    "reinit",
]
