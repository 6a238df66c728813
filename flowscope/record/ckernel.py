"""The CPU snapshot kernel (``snapshot.c``): built at first use, called through ctypes.

One call per snapshot reads a CPU tensor where it lies, through its sizes and strides (any
layout: transposed, sliced, a stride-0 ``expand``), and writes the recorder's row. Large
tensors are split over **torch's own OpenMP team**: torch's worker threads spin for
milliseconds between operations, so a pool of our own would only fight them; the kernel
calls the ``GOMP_parallel`` of the runtime torch links, whose address is passed in.

Building: the C file is compiled once per machine with the system C compiler (``$CC``, else
``cc``) in about half a second, ``-O3 -march=native`` with OpenMP SIMD pragmas but no OpenMP
runtime of its own, into ``$FLOWSCOPE_CACHE_DIR`` (default ``~/.cache/flowscope``), named by
a hash of the source, the compiler and the CPU; a build is written under a temporary name
and renamed, so processes building at once do not collide. Where no compiler works,
:func:`kernel` returns None once with a warning, and snapshots use the torch path.
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flowscope.record.fields import HistSpec, LogEdges, outward, sample_stride

__all__ = [
    "SOURCE",
    "Snapshotter",
    "build",
    "kernel",
    "log_tables",
    "snapshotter",
    "team_size",
    "torch_team",
]

SOURCE = Path(__file__).with_name("snapshot.c")
MAXDIM = 16
MOMENTS_FROM = 1 << 17  # from here the moments pass is split over torch's threads
HIST_FROM = 1 << 12  # ... and the histograms, from this many sampled values
FLAGS = ["-O3", "-shared", "-fPIC", "-fopenmp-simd", "-fno-math-errno", "-fno-trapping-math"]
F32, F64 = 0, 1


class Tensor(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("dtype", ctypes.c_int32),
        ("ndim", ctypes.c_int32),
        ("dense", ctypes.c_int32),
        ("pad_", ctypes.c_int32),
        ("numel", ctypes.c_int64),
        ("sample_stride", ctypes.c_int64),
        ("sizes", ctypes.c_int64 * MAXDIM),
        ("strides", ctypes.c_int64 * MAXDIM),
    ]


class Settings(ctypes.Structure):
    _fields_ = [
        ("bins", ctypes.c_int32),
        ("drop_zeros", ctypes.c_int32),
        ("has_sat", ctypes.c_int32),
        ("log_size", ctypes.c_int32),
        ("zero_index", ctypes.c_int32),
        ("log_steps", ctypes.c_int32),
        ("sat_lo", ctypes.c_double),
        ("sat_hi", ctypes.c_double),
        ("log_base", ctypes.c_void_p),
        ("log_thr", ctypes.c_void_p),
    ]


class Team(ctypes.Structure):
    _fields_ = [
        ("parallel", ctypes.c_void_p),
        ("thread_num", ctypes.c_void_p),
        ("threads", ctypes.c_int32),
        ("pad_", ctypes.c_int32),
        ("moments_from", ctypes.c_int64),
        ("hist_from", ctypes.c_int64),
    ]


# -- building -----------------------------------------------------------------------------------


def cache_dir() -> Path:
    """Where built kernels are kept: $FLOWSCOPE_CACHE_DIR, else ~/.cache/flowscope."""
    given = os.environ.get("FLOWSCOPE_CACHE_DIR")
    if given:
        return Path(given)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "flowscope"


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def _cpu() -> str:
    """What -march=native compiles for: the CPU's model and feature flags."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags"))]
        return "\n".join(sorted(set(lines)))
    except OSError:
        return platform.processor() or platform.machine()


def build(out_dir: Path | None = None) -> Path:
    """Compile ``snapshot.c`` (once per source, compiler and CPU) and return the library.

    Raises:
        OSError: no compiler, or it failed (the message holds its output).
    """
    cc = _compiler()
    if cc is None:
        raise OSError("no C compiler found (set CC, or install gcc)")
    source = SOURCE.read_bytes()
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    except OSError as err:
        raise OSError(f"the C compiler {cc!r} does not run: {err}") from err
    key = hashlib.sha256(
        b"\0".join(s.encode() if isinstance(s, str) else s for s in
                   (source, cc, version, " ".join(FLAGS), _cpu(), sys.platform))
    ).hexdigest()[:16]  # fmt: skip
    folder = out_dir or cache_dir()
    lib = folder / f"snapshot-{key}.so"
    if lib.is_file():
        return lib
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=lib.stem, suffix=".so.tmp", dir=folder)
    os.close(fd)
    try:
        errors = ""
        for extra in (["-march=native"], []):  # a compiler without -march=native: baseline
            done = subprocess.run(
                [cc, *FLAGS, *extra, "-o", tmp, str(SOURCE), "-lm"], capture_output=True, text=True
            )
            if done.returncode == 0:
                os.replace(tmp, lib)
                return lib
            errors = done.stderr[-2000:]
        raise OSError(f"{cc} could not build {SOURCE.name}: {errors}")
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


_LOCK = threading.Lock()
_KERNEL: Any = None  # the loaded library; False once building failed


def kernel() -> Any:
    """The loaded kernel library, built on first use; None where it cannot be (warned once)."""
    global _KERNEL
    if _KERNEL is None:
        with _LOCK:
            if _KERNEL is None:
                try:
                    lib = ctypes.CDLL(str(build()))
                    lib.fs_snapshot.argtypes = [ctypes.c_void_p] * 6
                    lib.fs_snapshot.restype = ctypes.c_int
                    _KERNEL = lib
                except OSError as err:
                    warnings.warn(
                        f"flowscope: the CPU snapshot kernel is not available ({err}); CPU "
                        "snapshots use torch ops, about twice as slow",
                        RuntimeWarning,
                        stacklevel=4,
                    )
                    _KERNEL = False
    return _KERNEL or None


# -- torch's team ------------------------------------------------------------------------------


@cache
def torch_team() -> tuple[int, int] | None:
    """Addresses of ``GOMP_parallel`` and ``omp_get_thread_num`` in the OpenMP runtime torch
    uses, or None when there is none to share (the kernel then runs on the calling thread)."""
    path = os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so")
    if not os.path.exists(path) or "OpenMP" not in torch.__config__.parallel_info():
        return None
    try:
        lib = ctypes.CDLL(path)  # already loaded by torch: the same handle, its own runtime
        gomp = ctypes.cast(lib.GOMP_parallel, ctypes.c_void_p).value
        thread_num = ctypes.cast(lib.omp_get_thread_num, ctypes.c_void_p).value
    except (OSError, AttributeError):  # not a GNU-compatible runtime
        return None
    return (gomp, thread_num) if gomp and thread_num else None


_forked = False  # set in a child made by fork(): its copy of the team's threads is gone


def _after_fork_in_child() -> None:
    global _forked
    _forked = True


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def team_size() -> int:
    """Threads to ask for: torch's own setting; 1 in a child made by ``fork()`` (GNU OpenMP
    waits there forever for the parent's threads; torch's own parallel ops hang alike)."""
    if _forked or torch_team() is None:
        return 1
    return torch.get_num_threads()


@cache
def _team(threads: int, moments_from: int, hist_from: int) -> Team:
    found = torch_team()
    if found is None or threads < 2:
        return Team(None, None, 1, 0, moments_from, hist_from)
    return Team(found[0], found[1], threads, 0, moments_from, hist_from)


# -- settings ------------------------------------------------------------------------------------


@cache
def log_tables(dtype: str, lo: int, hi: int, per_decade: int) -> tuple[np.ndarray, np.ndarray]:
    """Per exponent field of float32 (``"f"``) or float64 (``"d"``): the magnitude bin of the
    octave's lower end, and the decade edges inside the octave (padded with Inf).

    Magnitude bin of |x| = the number of float64 edges <= |x| (0 = underflow, edges.size =
    overflow). Exponent field 0 holds zeros and subnormals; the last holds Inf and NaN.

    Example:
        >>> base, thr = log_tables("f", -30, 30, 1)
        >>> int(base[127]), float(thr[127, 0])  # [1, 2): edge 1e0 is its low end, nothing inside
        (31, inf)
    """
    exp_bits, bias = (0xFF, 127) if dtype == "f" else (0x7FF, 1023)
    ks = range(lo * per_decade, hi * per_decade + 1)
    edges = np.array([10.0 ** (k / per_decade) for k in ks])  # Python's pow, as the torch path
    fields = exp_bits + 1
    base = np.empty(fields, dtype=np.int32)
    inside: list[np.ndarray] = []
    for e in range(fields):
        if e == exp_bits:  # Inf
            base[e] = edges.size
            inside.append(edges[:0])
            continue
        low = 0.0 if e == 0 else math.ldexp(1.0, e - bias)
        upper = e + 1 - bias  # the octave is [2**(e - bias), 2**upper); subnormals [0, ...)
        high = math.ldexp(1.0, upper) if upper < 1024 else math.inf
        base[e] = int(np.searchsorted(edges, low, side="right"))
        inside.append(edges[(edges > low) & (edges < high)])
    steps = max(1, max(len(t) for t in inside))
    thresholds = np.full((fields, steps), np.inf)
    for e, t in enumerate(inside):
        thresholds[e, : len(t)] = t
    return base, np.ascontiguousarray(thresholds)


@cache
def settings(
    dtype: torch.dtype,
    bins: int,
    drop_zeros: bool,
    saturation: tuple[float, float] | None,
    edges: LogEdges,
) -> Settings:
    """The kernel's settings for one dtype, histogram layout and saturation interval (the
    same for every snapshot of a layer: made once)."""
    base, thr = log_tables("f" if dtype == torch.float32 else "d", edges.lo, edges.hi,
                           edges.per_decade)  # fmt: skip
    lo, hi = outward(*saturation, dtype) if saturation is not None else (-math.inf, math.inf)
    out = Settings(
        bins, int(drop_zeros), int(saturation is not None), edges.size, edges.zero_index,
        thr.shape[1], lo, hi, base.ctypes.data, thr.ctypes.data,
    )  # fmt: skip
    out._keep = (base, thr)  # the tables live as long as it
    return out


# -- one snapshot --------------------------------------------------------------------------------


class _Scratch(threading.local):
    """Per thread: the tensor descriptor and the histogram counters, reused call after call."""

    def __init__(self) -> None:
        self.tensor = Tensor()
        self.tensor_at = ctypes.addressof(self.tensor)
        self.counts = np.empty(0, dtype=np.int32)
        self.counts_at = 0

    def counters(self, need: int) -> int:
        """The address of 2 * need int32 counters."""
        if self.counts.size < 2 * need:
            self.counts = np.empty(2 * need, dtype=np.int32)
            self.counts_at = self.counts.ctypes.data
        return self.counts_at


_scratch = _Scratch()


def _dense(sizes: tuple[int, ...], strides: tuple[int, ...]) -> bool:
    """Whether the elements fill one block of memory (a permutation of a contiguous layout)."""
    expected = 1
    for stride, size in sorted((st, sz) for st, sz in zip(strides, sizes, strict=True) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


class Snapshotter:
    """The kernel bound to one histogram layout, for snapshot after snapshot (the recorder's
    hot path): the settings of each dtype, saturation interval and zero rule made once.

    Example:
        >>> from flowscope.record.fields import HistSpec, row_width
        >>> take = Snapshotter(HistSpec(bins=4))
        >>> row = torch.empty(row_width(HistSpec(bins=4)), dtype=torch.float64)
        >>> take(torch.tensor([0.0, 1.0, 2.0, float("nan")]), None, False, row)
        >>> row[:3].tolist()  # numel, non-finite, NaN
        [4.0, 1.0, 1.0]
    """

    def __init__(self, spec: HistSpec) -> None:
        self.spec = spec
        self.lib = kernel()
        self._cfg: dict[tuple[torch.dtype, bool, tuple[float, float] | None], int] = {}
        self._size = max(spec.bins, spec.log.size) + 1
        self._call = self.lib.fs_snapshot  # bound once: an attribute lookup per call less
        self._teams: dict[int, tuple[int, int]] = {}  # torch's threads -> (team, counters)

    def __call__(
        self,
        x: torch.Tensor,
        saturation: tuple[float, float] | None,
        drop_zeros: bool,
        row: torch.Tensor,
    ) -> None:
        """Write the row of the float32/float64 CPU tensor ``x`` (numel > 0) into ``row``
        (float64, CPU)."""
        key = (x.dtype, drop_zeros, saturation)
        cfg = self._cfg.get(key)
        if cfg is None:
            made = settings(x.dtype, self.spec.bins, drop_zeros, saturation, self.spec.log)
            cfg = self._cfg[key] = ctypes.addressof(made)
        sc = _scratch
        t = sc.tensor
        n = x.numel()
        t.data = x.data_ptr()
        t.dtype = F32 if x.dtype == torch.float32 else F64
        t.numel = n
        t.sample_stride = 1 if n <= self.spec.sample else sample_stride(n, self.spec.sample)
        if x.is_contiguous():
            t.ndim = t.dense = 1
            t.sizes[0] = n
            t.strides[0] = 1
        else:
            sizes, strides = tuple(x.shape), x.stride()
            if len(sizes) > MAXDIM:  # rare: read a contiguous copy
                self(x.contiguous(), saturation, drop_zeros, row)
                return
            t.ndim, t.dense = len(sizes), int(_dense(sizes, strides))
            t.sizes[: len(sizes)] = sizes
            t.strides[: len(sizes)] = strides
        threads = 1 if _forked else torch.get_num_threads()
        team, need = self._teams.get(threads) or self._team(threads)
        counts = sc.counters(need)
        if self._call(sc.tensor_at, cfg, team, row.data_ptr(), counts, counts + 4 * need):
            raise RuntimeError(f"flowscope: the snapshot kernel refused a tensor of {x.shape}")

    def _team(self, threads: int) -> tuple[int, int]:
        """The team's address and the counters needed for ``threads`` (made once each)."""
        size = threads if torch_team() is not None else 1  # team_size() without a runtime
        made = (_team_at(size, MOMENTS_FROM, HIST_FROM), 4 * size * self._size)
        self._teams[threads] = made
        return made


@cache
def _team_at(threads: int, moments_from: int, hist_from: int) -> int:
    return ctypes.addressof(_team(threads, moments_from, hist_from))


@cache
def snapshotter(spec: HistSpec) -> Snapshotter:
    """The :class:`Snapshotter` of a histogram layout (one per layout and process)."""
    return Snapshotter(spec)
