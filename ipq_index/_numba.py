"""Numba options shared by every kernel module, the compile notice, and
thread control (a pool of Python threads running GIL-free kernels)."""

from __future__ import annotations

import itertools
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor, wait

import numba
import numba.core.event
import numpy as np
from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic

#: Options of every kernel: cached to disk, releases the GIL.
KERNEL_OPTIONS = dict(cache=True, nogil=True, error_model="numpy")
#: fewer queries than this run on the calling thread (more: query chunks on the pool)
SERIAL_QUERIES = 8


class _CompileNotice(numba.core.event.Listener):
    """Say on stderr (logger ``ipq_index``, once per process) that kernels are
    being compiled, and log each kernel at INFO level: the first use of a
    kernel compiles it (tens of seconds in all on a new machine; cached on
    disk afterwards, see ``ipq_index.warmup``) and would otherwise look
    like a hang."""

    def __init__(self):
        self.depth = 0
        self.said = False

    def on_start(self, event):
        fn = getattr(event.data.get("dispatcher"), "py_func", None)
        if fn is None or not fn.__module__.startswith("ipq_index."):
            return
        if self.depth == 0:
            if not self.said:
                self.said = True
                logging.getLogger("ipq_index").warning(
                    "ipq_index: compiling numba kernels on first use (once per machine: they are cached "
                    "on disk; `ipq warmup SPEC` compiles ahead)")
            logging.getLogger("ipq_index").info("compiling %s.%s", fn.__module__, fn.__name__)
        self.depth += 1

    def on_end(self, event):
        fn = getattr(event.data.get("dispatcher"), "py_func", None)
        if fn is not None and fn.__module__.startswith("ipq_index."):
            self.depth -= 1


numba.core.event.register("numba:compile", _CompileNotice())


def _one_build_per_type(dispatcher):
    """Let a kernel called from other kernels compile one version per plain
    argument type: numba would otherwise build a separate copy for every
    constant argument (``f(x, 0)`` next to ``f(x, i)``: ``Literal[int](0)``
    and int64), each costing its full compile time on first use.  The
    callers' constants are cast to their plain types."""
    get_template = dispatcher.get_call_template

    def get_call_template(args, kws):
        return get_template(tuple(types.unliteral(a) for a in args),
                            {k: types.unliteral(v) for k, v in kws.items()})

    dispatcher.get_call_template = get_call_template
    return dispatcher


def kernel(fn=None, **options):
    """``njit`` with the shared options (``KERNEL_OPTIONS``, overridable), one
    build per plain argument type.  Every kernel and helper is its own
    compiled function: numba links the callees' LLVM IR into each caller,
    where LLVM inlines them as it sees fit (inlining at the numba IR level,
    ``inline="always"``, re-types every inlined body per call site: 3-7x the
    compile time of the search kernels for the same speed)."""
    if fn is None:
        return lambda f: kernel(f, **options)
    return _one_build_per_type(numba.njit(**{**KERNEL_OPTIONS, **options})(fn))


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


def _trailing_zeros_codegen(context, builder, signature, args):
    i64 = ir.IntType(64)
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(i64, [i64, ir.IntType(1)]), "llvm.cttz.i64")
    return builder.call(fn, [args[0], ir.Constant(ir.IntType(1), 1)])


@intrinsic
def trailing_zeros(typingctx, x):
    """``trailing_zeros(x)`` inside kernels: the index of the lowest set bit
    of the int64 ``x`` (one ``tzcnt``); undefined for x = 0."""
    if not isinstance(x, types.Integer):
        return None
    return types.int64(types.int64), _trailing_zeros_codegen


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


def readonly(a):
    """``a`` as a read-only array (the array itself when it is one).  Every
    array an index or encoder keeps is read-only, built or loaded (a
    memory-mapped file is read-only anyway): the kernels then compile one
    version for both instead of one per writeability."""
    if a is None:
        return None
    a = np.asarray(a)
    if a.flags.writeable:
        a = a.view()
        a.flags.writeable = False
    return a


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


_default_threads = [0]  # set_num_threads' count (0: every core numba may use)


def _cgroup_cpus() -> int:
    """The CPU quota of this process's cgroup (v2 ``cpu.max``: a container
    limited to 1.5 CPUs gives 2), or a large number when there is none."""
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            return max(1, -(-int(quota) // int(period)))
    except (OSError, ValueError):
        pass
    return 1 << 30


def default_threads() -> int:
    """Threads used when none are set: ``NUMBA_NUM_THREADS`` when that
    variable is set, else the cores this process may run on (its CPU
    affinity and its cgroup's CPU quota), at most ``OMP_NUM_THREADS`` when
    that is set (as FAISS and NumPy's BLAS read it)."""
    limit = numba.config.NUMBA_NUM_THREADS
    if "NUMBA_NUM_THREADS" in os.environ:
        return limit
    if hasattr(os, "sched_getaffinity"):
        limit = min(limit, len(os.sched_getaffinity(0)))
    limit = min(limit, _cgroup_cpus())
    omp = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    if omp.isdigit() and int(omp) > 0:
        limit = min(limit, int(omp))
    return max(1, limit)


def resolve_threads(num_threads: int | None) -> int:
    """Map ``num_threads`` (``None``/``-1`` = the default: ``set_num_threads``,
    else ``default_threads``) to a thread count."""
    limit = numba.config.NUMBA_NUM_THREADS
    if num_threads is None or num_threads == -1:
        return _default_threads[0] or default_threads()
    if isinstance(num_threads, bool) or not isinstance(num_threads, (int, np.integer)) or num_threads < 1:
        raise ValueError(f"num_threads must be a positive int or -1, got {num_threads!r}")
    return min(int(num_threads), limit)


def set_num_threads(num_threads: int) -> None:
    """Set the default number of threads used by ipq_index (-1 = all cores)."""
    _default_threads[0] = 0 if num_threads == -1 else resolve_threads(num_threads)


def get_num_threads() -> int:
    """The default number of threads used by ipq_index (see ``set_num_threads``)."""
    return resolve_threads(-1)


# --------------------------------------------------------------------------
# Parallel work: every kernel is serial and releases the GIL; work is split
# into chunks run on a pool of Python threads.  No numba parallel region is
# used anywhere: no threading layer to compile (``parallel=True`` kernels cost
# seconds of compilation each) and none of OpenMP's restrictions on fork().
# --------------------------------------------------------------------------
_pool = [None]  # the ThreadPoolExecutor, made on first use
_pool_lock = threading.Lock()
_POOL_NAME = "ipq_index_pool"


def _reset_pool():
    _pool[0] = None  # a forked child has none of the parent's threads


os.register_at_fork(after_in_child=_reset_pool)


#: chunks per thread in ``map_chunks``: threads claim them one at a time, so a
#: thread slowed down (a busy core) holds up at most its last chunk
CLAIMS_PER_THREAD = 4


def map_chunks(call, n: int, num_threads: int | None = -1, min_chunk: int = 1) -> list:
    """``[call(a, b, p) ...]`` over consecutive chunks a:b of range(n), in
    order, run concurrently on up to ``num_threads`` threads (``p``: the
    index of the thread running the chunk, 0 = the calling thread; ``call``
    runs GIL-free kernels).  The first item runs alone first; the rest is
    cut into about ``CLAIMS_PER_THREAD`` chunks per thread (at least
    ``min_chunk`` items each) that the threads claim one by one, the calling
    thread among them: a thread that gets less of the CPU (another process
    on its core) claims fewer chunks instead of holding up the others."""
    nthreads = resolve_threads(num_threads)
    if threading.current_thread().name.startswith(_POOL_NAME):
        nthreads = 1  # already on a pool thread: waiting on the pool from it could deadlock
    parts = max(1, min(nthreads, (n - 1) // max(1, min_chunk)))
    if parts == 1:
        return [call(0, n, 0)]
    # the first item alone on this thread: the kernels the call runs compile
    # (or load from numba's cache) here, before several threads run them (a
    # kernel's first calls from two threads at once crashed the process)
    head = call(0, 1, 0)
    grain = max(min_chunk, -(-(n - 1) // (parts * CLAIMS_PER_THREAD)))
    bounds = list(range(1, n, grain)) + [n]
    results = [None] * (len(bounds) - 1)
    claims = itertools.count()  # next() is atomic under the GIL

    def work(p):
        while (c := next(claims)) < len(results):
            results[c] = call(bounds[c], bounds[c + 1], p)

    with _pool_lock:
        if _pool[0] is None:  # parts <= resolve_threads' limit: enough workers
            _pool[0] = ThreadPoolExecutor(max_workers=max(1, numba.config.NUMBA_NUM_THREADS - 1),
                                          thread_name_prefix=_POOL_NAME)
        pool = _pool[0]
    futures = [pool.submit(work, p) for p in range(1, parts)]
    try:
        work(0)
    finally:
        wait(futures)  # no chunk still runs once this returns or raises
    for f in futures:
        f.result()  # a worker's exception
    return [head] + results


def concat_rows(results: list):
    """Join ``map_chunks`` results along the first axis (arrays, or tuples of
    arrays joined element-wise)."""
    if len(results) == 1:
        return results[0]
    if isinstance(results[0], tuple):
        return tuple(np.concatenate(col) for col in zip(*results))
    return np.concatenate(results)


def split_rows(kernel_fn, n: int, num_threads, args, rows, min_chunk: int = 1):
    """``kernel_fn(*args)`` with the arguments at positions ``rows`` cut into
    row chunks (``[a:b]``) run concurrently; outputs joined by ``concat_rows``.
    For kernels whose rows are independent (one query, one vector each)."""
    rows = set(rows)

    def call(a, b, _part):
        return kernel_fn(*(x[a:b] if i in rows else x for i, x in enumerate(args)))

    return concat_rows(map_chunks(call, n, num_threads, min_chunk))


def cpu_count() -> int:
    return os.cpu_count() or 1
