"""Column names of flowscope's frames (no dependencies: shared by frames, spec and claims)."""

KEYS = ["run", "step", "layer_idx", "layer", "module_type", "kind", "call", "tensor"]
STATS = [
    "count",
    "nan",
    "inf",
    "mean",
    "std",
    "rms",
    "min",
    "max",
    "absmax",
    "frac_zero",
    "frac_saturated",
]
EXTRA = ["dtype", "device", "hist_stride"]
HIST_COLUMNS = ["hist", "bin", "lo", "hi", "count"]
PROBE_COLUMNS = ["probe", "step", "layer", "value"]
CONFIG_COLUMNS = ["config", "seed"]
RESERVED = frozenset(KEYS + STATS + EXTRA + HIST_COLUMNS + PROBE_COLUMNS + CONFIG_COLUMNS)
