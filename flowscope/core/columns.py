"""Column names of flowscope's frames (no dependencies: shared by frames, spec and claims)."""

# forward / backward / order: which forward pass (micro-batch) and which backward pass of the
# step a row came from, and the order of the gradient (see record/recorder.py::_Passes)
PASS_KEYS = ["forward", "backward", "order"]
PASS_DEFAULTS = {"forward": 0, "backward": -1, "order": 0}  # files written before them
KEYS = ["run", "step", "layer_idx", "layer", "module_type", "kind", "call", *PASS_KEYS, "tensor"]
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
