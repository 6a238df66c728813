"""Torch's own OpenMP threads, for the fused CPU kernels.

During a training step torch's OpenMP worker threads do not sleep between operations: they
spin for milliseconds, waiting for the next parallel region. A second thread pool of our own
(numba's, or Python threads) would fight them for the same cores and gain nothing. So large
snapshots run on torch's team instead: a compiled kernel calls ``GOMP_parallel`` of the
OpenMP runtime that torch itself links (looked up through ``libtorch_cpu``), and the spinning
workers pick the work up at once.

Everything here is optional: where torch does not use a GNU-compatible OpenMP runtime
(``GOMP_parallel`` not found), :func:`torch_team` returns None and the kernels run on the
calling thread.

The intrinsics turn integer addresses into calls and typed pointers inside compiled code,
so compiled functions can be cached on disk: no address is baked into them.
"""

from __future__ import annotations

import ctypes
import os
from functools import cache
from typing import Any

import torch
from llvmlite import ir
from numba import types
from numba.core.extending import intrinsic


@cache
def torch_team() -> tuple[int, int, int] | None:
    """Addresses of ``GOMP_parallel``, ``omp_get_thread_num`` and ``omp_get_num_threads`` in
    the OpenMP runtime torch uses, or None when there is none to share."""
    path = os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so")
    if not os.path.exists(path) or "OpenMP" not in torch.__config__.parallel_info():
        return None
    try:
        lib = ctypes.CDLL(path)  # already loaded by torch: the same handle, its own runtime
        names = ("GOMP_parallel", "omp_get_thread_num", "omp_get_num_threads")
        gomp, thread_num, num_threads = (
            ctypes.cast(getattr(lib, name), ctypes.c_void_p).value for name in names
        )
    except (OSError, AttributeError):  # symbols not there: not a GNU-compatible runtime
        return None
    if not (gomp and thread_num and num_threads):
        return None
    return gomp, thread_num, num_threads


_forked = False  # set in a child made by fork(): its copy of the team's threads is gone


def _after_fork_in_child() -> None:
    global _forked
    _forked = True


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def team_size() -> int:
    """Threads to ask for: torch's own setting (1 means run on the calling thread).

    1 in a child process made by ``fork()``: GNU OpenMP waits there forever for the parent's
    worker threads (torch's own parallel operations hang the same way), so after a fork the
    kernels stay on the calling thread.
    """
    if _forked or torch_team() is None:
        return 1
    return torch.get_num_threads()


def _call_int(typingctx: Any, addr: Any) -> Any:
    """``int f(void)`` at address ``addr`` (omp_get_thread_num and the like)."""

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        fnty = ir.FunctionType(ir.IntType(32), [])
        return builder.call(builder.inttoptr(args[0], fnty.as_pointer()), [])

    return types.int32(types.int64), codegen


def _run_team(typingctx: Any, gomp: Any, fn: Any, data: Any, threads: Any) -> Any:
    """``GOMP_parallel(fn, data, threads, 0)``: ``fn(data)`` on every thread of the team,
    the calling thread included; returns when all are done."""

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        i32 = ir.IntType(32)
        voidp = ir.IntType(8).as_pointer()
        body = ir.FunctionType(ir.VoidType(), [voidp]).as_pointer()
        gomp_ty = ir.FunctionType(ir.VoidType(), [body, voidp, i32, i32]).as_pointer()
        builder.call(
            builder.inttoptr(args[0], gomp_ty),
            [
                builder.inttoptr(args[1], body),
                builder.inttoptr(args[2], voidp),
                builder.trunc(args[3], i32),
                i32(0),
            ],
        )
        return context.get_dummy_value()

    return types.void(types.int64, types.int64, types.int64, types.int64), codegen


# typed Any: called from compiled code only, with the arguments the typing functions name
call_int: Any = intrinsic(_call_int)
run_team: Any = intrinsic(_run_team)


def _pointer_to(item: Any) -> Any:
    """An intrinsic: the typed pointer at an integer address (to build arrays with carray)."""

    @intrinsic
    def at(typingctx: Any, addr: Any) -> Any:
        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            return builder.inttoptr(args[0], context.get_value_type(item).as_pointer())

        return types.CPointer(item)(types.int64), codegen

    return at


float32_at = _pointer_to(types.float32)
float64_at = _pointer_to(types.float64)
int32_at = _pointer_to(types.int32)
int64_at = _pointer_to(types.int64)
