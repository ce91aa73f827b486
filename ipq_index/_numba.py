"""Numba options shared by every kernel module, and thread-count control."""

from __future__ import annotations

import contextlib
import os

import numba
from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic

#: Options for serial kernels: cached to disk, releases the GIL.
KERNEL_OPTIONS = dict(cache=True, nogil=True, error_model="numpy")
#: Options for kernels that use ``prange``.
PARALLEL_OPTIONS = dict(cache=True, nogil=True, error_model="numpy", parallel=True)

kernel = numba.njit(**KERNEL_OPTIONS)
#: Small helpers inlined into their callers at the numba IR level.
inline_kernel = numba.njit(inline="always", **KERNEL_OPTIONS)
parallel_kernel = numba.njit(**PARALLEL_OPTIONS)
#: fewer queries than this run serial kernels (no parallel region: cheaper
#: than starting the thread pool for a few queries)
SERIAL_QUERIES = 8


def _prefetch_codegen(context, builder, signature, args):
    """Emit ``llvm.prefetch`` (read, locality 3, data cache) for the address
    of arr[idx...] (args: the array, then one index per dimension)."""
    aryty = signature.args[0]
    ary = context.make_array(aryty)(context, builder, args[0])
    ptr = cgutils.get_item_pointer(context, builder, aryty, ary, list(args[1:]), wraparound=False)
    i8p = ir.IntType(8).as_pointer()
    i32 = ir.IntType(32)
    fnty = ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
    # the typed-pointer name, which LLVM >= 15 upgrades to its opaque-pointer form
    fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0i8")
    builder.call(fn, [builder.bitcast(ptr, i8p), ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
    return context.get_dummy_value()


@intrinsic
def prefetch(typingctx, arr, i, j):
    """``prefetch(arr, i, j)`` inside kernels: hint the CPU to load the cache
    line of arr[i, j] (2-D C array) for reading; no effect on results."""
    if not (isinstance(arr, types.Array) and arr.ndim == 2):
        return None
    return types.void(arr, types.intp, types.intp), _prefetch_codegen


@intrinsic
def prefetch1(typingctx, arr, i):
    """``prefetch1(arr, i)``: ``prefetch`` for the element arr[i] of a 1-D array."""
    if not (isinstance(arr, types.Array) and arr.ndim == 1):
        return None
    return types.void(arr, types.intp), _prefetch_codegen


class _VectorGEP(ir.Instruction):
    """``getelementptr inbounds elem, ptr base, <n x iK> idx``: a vector of
    element pointers from one base (llvmlite's ``gep`` takes scalar indices
    only); a masked gather through it lowers to one indexed x86 gather."""

    def __init__(self, parent, ptr, idx, elem_ty):
        super().__init__(parent, ir.VectorType(elem_ty.as_pointer(), idx.type.count), "getelementptr",
                         [ptr, idx])
        self.elem_ty = elem_ty

    def descr(self, buf):
        p, i = self.operands
        buf.append(f"getelementptr inbounds {self.elem_ty}, {p.type} {p.get_reference()}, "
                   f"{i.type} {i.get_reference()}\n")


def splat(builder, vec_t, value):
    """Emit a vector of type ``vec_t`` with every lane ``value`` (insert + broadcast shuffle)."""
    i32 = ir.IntType(32)
    v = builder.insert_element(ir.Constant(vec_t, ir.Undefined), value, ir.Constant(i32, 0))
    return builder.shuffle_vector(v, ir.Constant(vec_t, ir.Undefined),
                                  ir.Constant(ir.VectorType(i32, vec_t.count), [0] * vec_t.count))


def vector_gep(builder, ptr, idx, elem_ty):
    """Emit ``_VectorGEP`` at the builder's position: pointers ptr + idx[l] (elements of elem_ty)."""
    ins = _VectorGEP(builder.block, ptr, idx, elem_ty)
    builder._insert(ins)
    return ins


def target_has(feature: str) -> bool:
    """Whether numba's code generator targets a CPU with ``feature`` (an
    LLVM feature name such as "avx2"; honours NUMBA_CPU_NAME /
    NUMBA_CPU_FEATURES).  False when it cannot tell: kernels then take their
    portable form."""
    try:
        from numba.core.registry import cpu_target

        feats = cpu_target.target_context.codegen()._tm_features
    except Exception:  # pragma: no cover - numba internals moved
        return False
    return ("+" + feature) in str(feats).split(",")


def resolve_threads(num_threads: int | None) -> int:
    """Map ``num_threads`` (``None``/``-1`` = all) to a valid numba thread count."""
    limit = numba.config.NUMBA_NUM_THREADS
    if num_threads is None or num_threads == -1:
        return limit
    if not isinstance(num_threads, (int,)) or num_threads < 1:
        raise ValueError(f"num_threads must be a positive int or -1, got {num_threads!r}")
    return min(int(num_threads), limit)


@contextlib.contextmanager
def threads(num_threads: int | None):
    """Run a block with ``num_threads`` numba threads, restoring the previous count."""
    previous = numba.get_num_threads()
    numba.set_num_threads(resolve_threads(num_threads))
    try:
        yield
    finally:
        numba.set_num_threads(previous)


def set_num_threads(num_threads: int) -> None:
    """Set the default number of threads used by ipq_index kernels (-1 = all cores)."""
    numba.set_num_threads(resolve_threads(num_threads))


def cpu_count() -> int:
    return os.cpu_count() or 1
