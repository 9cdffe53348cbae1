"""Float32 subnormals flushed to zero on every thread that computes, for the length of training.

Once a run has memorised, its margins are large: wrong-class probabilities of e^-80 and less,
times the 1/N loss weights, fall below float32's smallest normal number (2^-126, about 1.2e-38)
when the float64 loss gradient is cast to float32 (12% of the logits' gradient entries at epoch
9,400 of a nanda run), and on many x86 CPUs every operation that reads or writes a subnormal
takes a slow path (a microcode assist). On the AVX2 EPYC host of issue 17 the fused step went
from 18 ms at the initialisation to 118 ms on a nanda run's epoch-9,300 weights, most of it in
the batched matmuls of the MLP/unembedding backward. (Some cores pay nothing: the AVX-512 EPYC
of the 2026-12-04 entry in ``docs/benchmarks.md`` ran the same weights at full speed.)

The x86 fix is the MXCSR register's two mode bits: FTZ (a subnormal result is written as 0) and
DAZ (a subnormal input is read as 0). ``torch.set_flush_denormal`` sets them on the calling
thread only, and a step computes on three kinds of thread: the caller, torch's intra-op pool
(OpenMP, shared by MKL and oneDNN) and Numba's pool (:mod:`circuits.engine.mix`'s kernels).
:func:`flush_subnormals` sets the bits on all of them, checks that a parallel torch op and every
Numba thread really flush, and on exit puts every thread back as it found the caller.

What changes: only operations whose input or exact result is below 2^-126 in magnitude (2^-1022
in float64), each result by less than that. Every thread flushes, so the step's bits stay
independent of the thread count, and a step without subnormals keeps its bits (tested). Added to a
float32 number above 2^-102 (about 2e-31), such a term is under half an ulp and changes
nothing, so the trajectory moves only by rounding-sized amounts, which training may amplify as it amplifies
any rounding (measured on many seeds in ``docs/benchmarks.md``).

Only x86-64 has the MXCSR; elsewhere (ARM: Apple silicon, Graviton) the context does nothing:
those cores handle subnormals at close to full speed.
"""

from __future__ import annotations

import ctypes
import os
import platform
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import no_type_check

import numba
import numpy as np
import torch
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

__all__ = ["flush_subnormals", "flushing", "subnormal_count"]

#: MXCSR's flush-to-zero (bit 15) and denormals-are-zero (bit 6) mode bits.
FTZ_DAZ = np.uint32((1 << 15) | (1 << 6))
#: float32's smallest normal number, 2^-126.
FLOAT32_TINY = torch.finfo(torch.float32).tiny

_X86 = platform.machine().lower() in ("x86_64", "amd64")
_lock = threading.Lock()
_depth = 0
_active = False


def subnormal_count(x: torch.Tensor) -> int:
    """How many entries of a floating tensor are subnormal in its own dtype (nonzero, below the
    smallest normal number in magnitude)."""
    tiny = torch.finfo(x.dtype).tiny
    a = x.detach().abs()
    return int(((a > 0) & (a < tiny)).sum())


def _csr_call(builder: ir.IRBuilder, name: str, slot: ir.Value) -> None:
    fnty = ir.FunctionType(ir.VoidType(), [ir.PointerType(ir.IntType(8))])
    fn = cgutils.get_or_insert_function(builder.module, fnty, name)
    builder.call(fn, [builder.bitcast(slot, ir.PointerType(ir.IntType(8)))])


@intrinsic
def _read_csr(typingctx):  # type: ignore[no-untyped-def]  # pragma: no cover
    def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
        slot = cgutils.alloca_once(builder, ir.IntType(32))
        _csr_call(builder, "llvm.x86.sse.stmxcsr", slot)
        return builder.load(slot)

    return types.uint32(), codegen


@intrinsic
def _write_csr(typingctx, value):  # type: ignore[no-untyped-def]  # pragma: no cover
    def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
        slot = cgutils.alloca_once(builder, ir.IntType(32))
        builder.store(args[0], slot)
        _csr_call(builder, "llvm.x86.sse.ldmxcsr", slot)
        return context.get_dummy_value()

    return types.void(types.uint32), codegen


# @no_type_check: the tests' jaxtyping import hook would otherwise wrap these in a checker
# that Numba can neither compile nor cache (as in circuits.engine.mix).
@numba.njit(cache=True, nogil=True)
@no_type_check
def _set_modes(on):  # pragma: no cover
    # Only the two mode bits change: rounding and the exception masks and flags stay.
    cur = _read_csr()
    _write_csr((cur | FTZ_DAZ) if on else (cur & ~FTZ_DAZ))
    return _read_csr() & FTZ_DAZ


@numba.njit(cache=True, nogil=True)
@no_type_check
def _modes():  # pragma: no cover
    return _read_csr() & FTZ_DAZ


@numba.njit(parallel=True, cache=True, nogil=True)
@no_type_check
def _set_numba_pool(on, seen):  # pragma: no cover
    # Numba splits a prange statically, so with several items per thread every thread of the
    # pool gets some; each records its id and the modes it ends with, for the caller to check.
    for i in numba.prange(seen.shape[0]):
        seen[i, 1] = _set_modes(on)
        seen[i, 0] = numba.get_thread_id()


_team_fn: object = None


def _team_callback() -> int:
    """Address of a C function ``void f(void *flag)`` that sets the modes on its thread."""
    global _team_fn
    if _team_fn is None:

        @numba.cfunc(types.void(types.voidptr), cache=True, nogil=True)
        @no_type_check
        def team(data):  # pragma: no cover
            _set_modes(numba.carray(data, (1,), np.uint32)[0] != 0)

        _team_fn = team
    return _team_fn.address  # type: ignore[attr-defined]


def _openmp_runtime() -> ctypes.CDLL | None:
    """The OpenMP runtime torch's intra-op pool runs on (its bundled libgomp, or the one it was
    linked against), already loaded; None if torch's parallel backend is not OpenMP."""
    if not torch.backends.openmp.is_available():
        return None
    lib = Path(torch.__file__).parent / "lib"
    candidates = [lib / "libgomp.so.1", lib / "libiomp5.so"]
    candidates += [Path(p) for p in _loaded_libraries() if "libgomp" in p or "libiomp" in p]
    for path in candidates:
        try:
            return ctypes.CDLL(str(path), mode=getattr(os, "RTLD_NOLOAD", 0) | ctypes.RTLD_GLOBAL)
        except OSError:
            continue
    return None


def _loaded_libraries() -> list[str]:
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return []
    return list(dict.fromkeys(line.split()[-1] for line in maps.splitlines() if ".so" in line))


def _set_torch_pool(on: bool) -> None:
    """Run a parallel region of torch.get_num_threads() threads on torch's OpenMP runtime,
    each thread setting its modes: the same pool that torch's next parallel ops run on."""
    omp = _openmp_runtime()
    if omp is None:
        return
    parallel = omp.GOMP_parallel
    parallel.restype = None
    parallel.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
    flag = np.array([1 if on else 0], dtype=np.uint32)
    parallel(_team_callback(), flag.ctypes.data, torch.get_num_threads(), 0)


def _set_all(on: bool) -> bool:
    """Set the modes on the caller, torch's pool and Numba's pool; True if every thread took it."""
    _set_torch_pool(on)  # the region's thread 0 is the caller
    _set_modes(on)
    n_numba = numba.config.NUMBA_NUM_THREADS
    previous = numba.get_num_threads()
    numba.set_num_threads(n_numba)  # threads masked off now may be given work later
    try:
        for _ in range(4):
            seen = np.zeros((8 * n_numba, 2), dtype=np.int64)
            _set_numba_pool(on, seen)
            if len(set(seen[:, 0].tolist())) == n_numba:
                break
        else:
            return False
    finally:
        numba.set_num_threads(previous)
    want = int(FTZ_DAZ) if on else 0
    return bool((seen[:, 1] == want).all()) and int(_modes()) == want and _torch_flushes() == on


def _torch_flushes() -> bool:
    """Whether a torch elementwise op split over every intra-op thread flushes its subnormal
    results: the property training needs, checked on the threads that compute it."""
    n = 2 * 32768 * max(1, torch.get_num_threads())  # at::parallel_for's grain is 32768
    out = torch.full((n,), 2.0**-100, dtype=torch.float32) * 2.0**-30  # exact result 2^-130
    return not bool(out.any())


def flushing() -> bool:
    """Whether a :func:`flush_subnormals` context is active (and took effect) in this process."""
    return _active


@contextmanager
def flush_subnormals() -> Iterator[bool]:
    """Flush float32 and float64 subnormals to zero on every computing thread while inside.

    Yields whether flushing is in effect: False on a CPU without the MXCSR (not x86-64), and
    False, with a warning, if some thread could not be set (no thread is then left flushing, so
    results never depend on which thread computed them). Re-entrant: an inner context changes
    nothing. On exit every thread gets the modes the caller had on entry. Training enters it
    (``circuits.trainer.deterministic``); a notebook may wrap its own loop in it.
    """
    global _depth, _active
    if not _X86:
        yield False
        return
    with _lock:
        _depth += 1
        outer = _depth == 1
        if outer:
            before = bool(_modes())
            _active = _set_all(True)
            if not _active:
                _set_all(before)
                warnings.warn(
                    "could not flush float32 subnormals on every thread: training after "
                    "memorisation may run several times slower", RuntimeWarning, stacklevel=3,
                )
    try:
        yield _active
    finally:
        with _lock:
            _depth -= 1
            if outer:
                _active = False
                _set_all(before)
