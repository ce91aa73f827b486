"""4-bit fast-scan kernels: blocked coarse codes scored with in-register
lookup tables (``vpermb`` or ``pshufb``), candidates kept by a threshold
collector.

Layout.  Coarse codes have M 4-bit sub-quantizers packed two per byte (byte g:
low nibble sub-quantizer 2g, high nibble 2g + 1; G = M / 2 bytes per row).
Rows are grouped by 32 into blocks ``blocks[b]`` of (Gp, 32) bytes, Gp = G
padded with zero bytes to a multiple of ``BYTE_STEP``; an IVF list (or the
whole flat index: one list) occupies whole blocks, padding slots have row
-1 in ``block_rows``.  The order of a block's bytes depends on the CPU:

- byte lanes (``pshufb`` kernels): ``blocks[b, g, v]`` = byte g of the
  block's v-th row, so one 32-byte load holds byte g of 32 rows;
- dwords (``DWORDS``: AVX-512 VBMI and VNNI): bytes 4j..4j + 3 of row v at
  offsets 128 j + 4 v .. 128 j + 4 v + 3 of the block, so a 64-byte load
  holds four code bytes of 16 rows, each row in one dword.

Tables.  A query's 16-entry float table of each sub-quantizer is quantized
to uint8 (``quantize_luts``: minus its minimum, times one scale for all
tables, the two tables of one code byte spanning at most 255 together, so
the kernels add them as bytes).  Byte lanes: each table is stored twice
(one 16-byte copy per 128-bit lane, as ``pshufb`` looks up within lanes):
for bytes g = 2h, 2h + 1, 128 bytes [lo(2h) | lo(2h + 1) | hi(2h) | hi(2h + 1)],
lo(g) the table of sub-quantizer 2g (low nibbles), hi(g) that of 2g + 1,
so a 64-byte register holds the tables of two code bytes.  Dwords: for
bytes g = 4j .. 4j + 3, 128 bytes [lo(4j) .. lo(4j + 3) | hi(4j) .. hi(4j + 3)],
each table once: a 64-byte ``vpermb`` table indexed by nibble + 16 (g - 4j).
A row's score is the sum of its M entries (uint16, no overflow): the coarse
score minus a per-query constant, times the scale, up to the rounding of
each entry (FAISS's fast-scan quantizes the same way).

Scoring.  ``block_scores`` sums a block's 32 scores with byte lookups and
returns the bit mask of rows scoring at least the collector's threshold, so
the common case (no row good enough) costs one compare per block.  Dwords:
``vpermb`` looks up a register of 64 nibbles (low or high ones of four code
bytes of 16 rows), the two lookups of a code byte are added as bytes and
``vpdpbusd`` adds each row's four bytes into its 32-bit sum;
``block_scores_group`` scores ``GROUP`` queries at once, their nibble
indices built once per register.  Byte lanes: AVX-512BW or AVX2 byte
shuffles (LLVM's ``pshuf.b`` intrinsics), the sums kept as uint16 lanes.
Elsewhere an equivalent scalar loop (same integers, tested equal).

Collector.  Rows passing the threshold are appended (one step per passing row)
to a buffer of ``BUFFER`` kk; when it fills, the kk-th largest score t is
found (radix select), the best kk kept and the threshold raised to t + 1
(FAISS's "reservoir" idea, without its heap).  IVF lists come best first
(``probe._probe_select``), so the threshold rises early.  The final kk are
returned unordered (the rescoring ranks them).

Tiles.  A block is read from L3 or memory at about 26 GB/s on one core,
which bounds one query's scan of a large list; queries that scan the same
lists (a flat index) score each block for a tile of queries while it is in
cache (``_scan_tile``), with the same rows as one query at a time.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from .._numba import kernel, splat, target_has, trailing_zeros
from .coarse_tables import _coarse_luts
from .probe import _probe_tile, probe_tile_rows
from .rerank import PLAN_FIELDS, PLAN_TABLES, rescore_more, search_outputs
from .rotation import rotate_tile
from .topk import ids_of_rows_one

#: rows per block
BLOCK = 32
#: blocks prefetched ahead of the one being scored (and of the next list)
PREFETCH = 8
#: the collector keeps up to this many times kk rows before a compaction
BUFFER = 4
#: a sample of every SAMPLE_STEP-th block sets the collector's first
#: threshold when a query keeps at least SAMPLE_KK rows and scans between
#: SAMPLE_MIN * kk and SAMPLE_MAX * kk rows (fewer: the collector is cheap,
#: the sample is not; more: the threshold rises early anyway, while the
#: sample costs a strided pass and a rescan when it aims too high: GloVe
#: 399k rows, 50 candidates (a first threshold at sample rank 2 kk / 16, too
#: high for 5% of queries) 381 us unsampled vs 393 sampled, 100: 399 vs 384,
#: 200: 432 vs 386; ``_sample_rank`` aims lower)
SAMPLE_STEP, SAMPLE_MIN, SAMPLE_MAX, SAMPLE_KK = 16, 64, 4096, 32
#: bytes from a code byte's low-nibble table to its high-nibble one
LUT_STRIDE = 64
#: a tile of queries (``_scan_tile``, module doc) holds at most this many
#: bytes of tables: they stay in a 32-48 KiB L1 data cache beside the block
TILE_TABLE_BYTES = 24 * 1024
#: and at most this many queries (byte lanes, a pool of 400 per query, one
#: thread: GloVe-50, 12,469 blocks of 22 bytes, 378 us per query in tiles
#: of 8, 359 in tiles of 16, 523 alone; npm MiniLM, 104 sub-quantizers, the
#: table bound of 7: 106-114 us for tiles of 6 to 16, 162 alone.  Dwords,
#: flat batch fs=4: npm 66-72 us per query and GloVe 156-166 for table
#: bounds of 16 to 48 KiB and up to 32 queries: no size wins)
TILE_QUERIES = 16


#: byte width of the shuffles that score blocks: 64 (AVX-512BW), 32 (AVX2)
#: or 0 (no byte shuffles: a scalar loop with the same integers)
SIMD_WIDTH = 64 if target_has("avx512bw") else 32 if target_has("avx2") else 0
SIMD = SIMD_WIDTH > 0
#: the dword layout and kernel (module doc): AVX-512 byte permutes (VBMI) and
#: byte dot products (VNNI).  Single-thread scan of 50k rows, 46 code bytes:
#: 0.61 ns per row and query in groups of 4 against 0.97 with ``pshufb``;
#: one query 0.92 against 1.14 (AMD EPYC, Zen 4)
DWORDS = SIMD_WIDTH == 64 and target_has("avx512vbmi") and target_has("avx512vnni")
#: a row's code bytes are padded to a multiple of this (the bytes of a kernel step per row)
BYTE_STEP = 4 if DWORDS else 2
#: bytes of quantized tables per code byte (two sub-quantizers; byte lanes: two copies each)
LUT_BYTES = 32 if DWORDS else 64
#: queries ``block_scores_group`` scores at once
GROUP = 4 if DWORDS else 1


def _block_scores_codegen(width):
    """LLVM IR of ``block_scores`` with ``width``-byte shuffles (32: AVX2,
    64: AVX-512BW, two code bytes g per step)."""
    name = {32: "llvm.x86.avx2.pshuf.b", 64: "llvm.x86.avx512.pshuf.b.512"}[width]
    per = width // BLOCK  # code bytes g per step

    def codegen(context, builder, signature, args):
        blocks_t, _, lut_t, _, out_t, _ = signature.args
        blocks = context.make_array(blocks_t)(context, builder, args[0])
        lut = context.make_array(lut_t)(context, builder, args[2])
        out = context.make_array(out_t)(context, builder, args[4])
        b, q, thr = args[1], args[3], args[5]
        i8, i16, i32, i64 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
        vb = ir.VectorType(i8, width)
        vw = ir.VectorType(i16, width // 2)
        pshufb = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vb, [vb, vb]), name)
        zero = ir.Constant(i64, 0)
        steps = builder.udiv(builder.extract_value(blocks.shape, 1), ir.Constant(i64, per))
        cptr = cgutils.get_item_pointer(context, builder, blocks_t, blocks, [b, zero, zero], wraparound=False)
        lptr = cgutils.get_item_pointer(context, builder, lut_t, lut, [q, zero], wraparound=False)
        nib = ir.Constant(vb, [15] * width)
        four = ir.Constant(vb, [4] * width)
        eight = ir.Constant(vw, [8] * (width // 2))
        # FAISS's accumulation: a byte vector read as uint16 lanes adds (even
        # byte + 256 odd byte) to acc_all and the odd byte to acc_odd (no
        # widening shuffles); even-byte sums = acc_all - 256 acc_odd (mod 2^16)
        acc_all = cgutils.alloca_once_value(builder, ir.Constant(vw, None))
        acc_odd = cgutils.alloca_once_value(builder, ir.Constant(vw, None))

        def load(ptr, offset):
            return builder.load(builder.bitcast(builder.gep(ptr, [offset]), vb.as_pointer()), align=1)

        with cgutils.for_range(builder, steps) as loop:
            h = loop.index
            c = load(cptr, builder.mul(h, ir.Constant(i64, width)))
            if width == 64:  # tables of g = 2h, 2h + 1: [lo 64 B | hi 64 B]
                lo_off = builder.mul(h, ir.Constant(i64, 2 * LUT_STRIDE))
            else:  # g = h: lo at (g >> 1) * 128 + (g & 1) * 32, hi 64 B later
                lo_off = builder.add(builder.mul(builder.lshr(h, ir.Constant(i64, 1)), ir.Constant(i64, 2 * LUT_STRIDE)),
                                     builder.mul(builder.and_(h, ir.Constant(i64, 1)), ir.Constant(i64, 32)))
            t_lo = load(lptr, lo_off)
            t_hi = load(lptr, builder.add(lo_off, ir.Constant(i64, LUT_STRIDE)))
            r_lo = builder.bitcast(builder.call(pshufb, [t_lo, builder.and_(c, nib)]), vw)
            r_hi = builder.bitcast(builder.call(pshufb, [t_hi, builder.and_(builder.lshr(c, four), nib)]), vw)
            # a code byte's two entries sum to at most 255 (``_quantize_one``): the
            # uint16 lanes of r_lo + r_hi hold the even rows' sums in their low
            # byte without a carry into the odd rows' high byte
            both = builder.add(r_lo, r_hi)
            builder.store(builder.add(builder.load(acc_all), both), acc_all)
            builder.store(builder.add(builder.load(acc_odd), builder.lshr(both, eight)), acc_odd)
        odd = builder.load(acc_odd)
        even = builder.sub(builder.load(acc_all), builder.shl(odd, eight))
        if width == 64:  # lanes 16..31 hold the odd g of each step: fold them
            def fold(v):
                lo = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(i32, 16), list(range(16))))
                hi = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(i32, 16), list(range(16, 32))))
                return builder.add(lo, hi)
            even, odd = fold(even), fold(odd)
        # interleave: row 2i = even[i], row 2i + 1 = odd[i]
        total = builder.shuffle_vector(even, odd, ir.Constant(ir.VectorType(i32, 32),
                                                              [i // 2 + 16 * (i % 2) for i in range(32)]))
        builder.store(total, builder.bitcast(out.data, total.type.as_pointer()), align=1)
        mask = builder.icmp_unsigned(">=", total, splat(builder, total.type, builder.trunc(thr, i16)))
        return builder.zext(builder.bitcast(mask, i32), i64)

    return codegen


@intrinsic
def _block_scores_simd(typingctx, blocks, b, lut, q, out, thr):
    ok = (isinstance(blocks, types.Array) and blocks.ndim == 3 and blocks.dtype == types.uint8
          and blocks.layout == "C" and isinstance(lut, types.Array) and lut.ndim == 2
          and lut.dtype == types.uint8 and lut.layout == "C" and isinstance(out, types.Array)
          and out.dtype == types.uint16 and out.ndim == 1 and SIMD)
    if not ok:
        return None
    sig = types.int64(blocks, types.int64, lut, types.int64, out, types.int64)
    return sig, _block_scores_codegen(SIMD_WIDTH)


def _dword_scores_codegen(nq):
    """LLVM IR of the dword kernel (module doc) for nq queries q0 .. q0 +
    nq - 1: nq = 1 is ``block_scores`` (returns the mask), else
    ``block_scores_group`` (scores into out[t], masks into masks[t])."""

    def codegen(context, builder, signature, args):
        blocks_t, lut_t, out_t = signature.args[0], signature.args[2], signature.args[4]
        blocks = context.make_array(blocks_t)(context, builder, args[0])
        lut = context.make_array(lut_t)(context, builder, args[2])
        out = context.make_array(out_t)(context, builder, args[4])
        b, q0 = args[1], args[3]
        i8, i16, i32, i64 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
        vb, vd, vw = ir.VectorType(i8, 64), ir.VectorType(i32, 16), ir.VectorType(i16, 32)
        permb = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vb, [vb, vb]),
                                               "llvm.x86.avx512.permvar.qi.512")
        dpbusd = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vd, [vd, vb, vb]),
                                                "llvm.x86.avx512.vpdpbusd.512")
        zero = ir.Constant(i64, 0)
        steps = builder.udiv(builder.extract_value(blocks.shape, 1), ir.Constant(i64, 4))
        cptr = cgutils.get_item_pointer(context, builder, blocks_t, blocks, [b, zero, zero], wraparound=False)
        row = builder.extract_value(lut.strides, 0)
        lbase = builder.bitcast(lut.data, i8.as_pointer())
        lptrs = [builder.gep(lbase, [builder.mul(builder.add(q0, ir.Constant(i64, t)), row)]) for t in range(nq)]
        nib = ir.Constant(vb, [15] * 64)
        # byte p of a 64-byte load is code byte 4j + p % 4 of its row: its tables sit 16 (p % 4) into the step's
        offs = ir.Constant(vb, [16 * (p % 4) for p in range(64)])
        four = ir.Constant(vw, [4] * 32)
        ones = ir.Constant(vb, [1] * 64)
        # per query: the sums of rows 0-15 and of rows 16-31 (uint32 lanes)
        accs = [cgutils.alloca_once_value(builder, ir.Constant(vd, None)) for _ in range(2 * nq)]

        def load(ptr, offset):
            return builder.load(builder.bitcast(builder.gep(ptr, [offset]), vb.as_pointer()), align=1)

        with cgutils.for_range(builder, steps) as loop:
            off = builder.mul(loop.index, ir.Constant(i64, 128))
            idx = []
            for half in range(2):  # rows 0-15, 16-31
                c = load(cptr, builder.add(off, ir.Constant(i64, 64 * half)))
                high = builder.bitcast(builder.lshr(builder.bitcast(c, vw), four), vb)
                idx.append((builder.or_(builder.and_(c, nib), offs), builder.or_(builder.and_(high, nib), offs)))
            for t in range(nq):
                t_lo = load(lptrs[t], off)
                t_hi = load(lptrs[t], builder.add(off, ir.Constant(i64, LUT_STRIDE)))
                for half in range(2):
                    # a code byte's two entries sum to at most 255 (``_quantize_one``): added as bytes
                    both = builder.add(builder.call(permb, [t_lo, idx[half][0]]),
                                       builder.call(permb, [t_hi, idx[half][1]]))
                    acc = accs[2 * t + half]
                    builder.store(builder.call(dpbusd, [builder.load(acc), both, ones]), acc)
        mask = None
        for t in range(nq):
            halves = [builder.trunc(builder.load(accs[2 * t + h]), ir.VectorType(i16, 16)) for h in range(2)]
            total = builder.shuffle_vector(halves[0], halves[1], ir.Constant(ir.VectorType(i32, 32), list(range(32))))
            optr = out.data if nq == 1 else cgutils.get_item_pointer(context, builder, out_t, out,
                                                                     [ir.Constant(i64, t), zero], wraparound=False)
            builder.store(total, builder.bitcast(optr, total.type.as_pointer()), align=1)
            if nq == 1:
                thr = args[5]
            else:
                thr_a = context.make_array(signature.args[5])(context, builder, args[5])
                thr = builder.load(cgutils.get_item_pointer(context, builder, signature.args[5], thr_a,
                                                            [ir.Constant(i64, t)], wraparound=False))
            hit = builder.icmp_unsigned(">=", total, splat(builder, total.type, builder.trunc(thr, i16)))
            mask = builder.zext(builder.bitcast(hit, i32), i64)
            if nq > 1:
                masks_a = context.make_array(signature.args[6])(context, builder, args[6])
                builder.store(mask, cgutils.get_item_pointer(context, builder, signature.args[6], masks_a,
                                                             [ir.Constant(i64, t)], wraparound=False))
        return mask if nq == 1 else context.get_dummy_value()

    return codegen


def _c_array(a, dtype, ndim):
    return isinstance(a, types.Array) and a.dtype == dtype and a.ndim == ndim and a.layout == "C"


@intrinsic
def _dword_scores(typingctx, blocks, b, lut, q, out, thr):
    if not (DWORDS and _c_array(blocks, types.uint8, 3) and _c_array(lut, types.uint8, 2)
            and _c_array(out, types.uint16, 1)):
        return None
    return types.int64(blocks, types.int64, lut, types.int64, out, types.int64), _dword_scores_codegen(1)


@intrinsic
def _dword_scores_group(typingctx, blocks, b, lut, q0, out, thr, masks):
    if not (DWORDS and _c_array(blocks, types.uint8, 3) and _c_array(lut, types.uint8, 2)
            and _c_array(out, types.uint16, 2) and _c_array(thr, types.int64, 1) and _c_array(masks, types.int64, 1)):
        return None
    sig = types.void(blocks, types.int64, lut, types.int64, out, thr, masks)
    return sig, _dword_scores_codegen(GROUP)


def _prefetch_block_codegen(context, builder, signature, args):
    blocks_t = signature.args[0]
    blocks = context.make_array(blocks_t)(context, builder, args[0])
    i8p = ir.IntType(8).as_pointer()
    i32, i64 = ir.IntType(32), ir.IntType(64)
    zero = ir.Constant(i64, 0)
    base = builder.bitcast(cgutils.get_item_pointer(context, builder, blocks_t, blocks, [args[1], zero, zero],
                                                    wraparound=False), i8p)
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]),
                                        "llvm.prefetch.p0i8")
    nbytes = builder.mul(builder.extract_value(blocks.shape, 1), ir.Constant(i64, BLOCK))
    lines = builder.udiv(nbytes, ir.Constant(i64, 64))
    with cgutils.for_range(builder, lines) as loop:
        p = builder.gep(base, [builder.mul(loop.index, ir.Constant(i64, 64))])
        builder.call(fn, [p, ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
    return context.get_dummy_value()


@intrinsic
def _prefetch_block(typingctx, blocks, b):
    """Hint the CPU to load every cache line of block b (no effect on results)."""
    if not (isinstance(blocks, types.Array) and blocks.ndim == 3 and blocks.layout == "C"):
        return None
    return types.void(blocks, types.int64), _prefetch_block_codegen


@kernel
def _append_passing(buf, mask, slot0, res_v, res_i, cnt, add):
    """Append the rows of bit mask ``mask`` (bit v: row v of the block whose
    first slot is ``slot0``) to the collector: scores buf[v] + add (the
    list's bias, no overflow: see ``_list_bias``) to res_v and slots
    slot0 + v to res_i from position cnt, in row order (they need room for
    the mask's rows); returns the new count.  One iteration per set bit (a
    block passes one or two rows once the threshold has risen): 2-12 ns
    per block where LLVM's ``masked.compressstore`` of the 32 lanes took
    82-90 ns whatever the mask (AMD EPYC, AVX-512; a loop over random
    masks)."""
    m = mask
    while m != 0:
        v = trailing_zeros(m)
        res_v[cnt] = buf[v] + add
        res_i[cnt] = slot0 + v
        cnt += 1
        m &= m - 1
    return cnt


@kernel
def _code_byte(blocks, b, g, v):
    """Byte g of the v-th row of block b (either layout, module doc)."""
    if DWORDS:
        i = (g >> 2) * 128 + v * 4 + (g & 3)
        return blocks[b, i >> 5, i & 31]
    return blocks[b, g, v]


@kernel
def _table_at(m):
    """Offset of sub-quantizer m's 16 table entries in a query's tables (the
    first copy; byte lanes hold a second one 16 bytes later)."""
    g = m >> 1
    if DWORDS:
        return (g >> 2) * 128 + (g & 3) * 16 + (m & 1) * LUT_STRIDE
    return (g >> 1) * 2 * LUT_STRIDE + (g & 1) * 32 + (m & 1) * LUT_STRIDE


@kernel
def block_scores_scalar(blocks, b, lut, q, out, thr):
    """Scalar ``block_scores`` (identical integers): targets without AVX2, and the tests' reference."""
    for v in range(BLOCK):
        out[v] = 0
    for g in range(blocks.shape[1]):
        lo = _table_at(2 * g)
        hi = _table_at(2 * g + 1)
        for v in range(BLOCK):
            c = _code_byte(blocks, b, g, v)
            out[v] += np.uint16(lut[q, lo + (c & 15)]) + np.uint16(lut[q, hi + (c >> 4)])
    mask = 0
    for v in range(BLOCK):
        if out[v] >= thr:
            mask |= 1 << v
    return mask


if DWORDS:
    @kernel
    def block_scores(blocks, b, lut, q, out, thr):
        """Scores (uint16) of block b's 32 rows for query q's tables into
        ``out``; returns the mask of rows v (bit v) with score >= thr."""
        return _dword_scores(blocks, b, lut, q, out, np.int64(thr))

    @kernel
    def block_scores_group(blocks, b, lut, q0, out, thr, masks):
        """``block_scores`` of queries q0 .. q0 + GROUP - 1: scores into
        out[t], thresholds thr[t], masks into masks[t]."""
        _dword_scores_group(blocks, b, lut, q0, out, thr, masks)
else:
    if SIMD:
        @kernel
        def block_scores(blocks, b, lut, q, out, thr):
            """Scores (uint16) of block b's 32 rows for query q's tables into
            ``out``; returns the mask of rows v (bit v) with score >= thr."""
            return _block_scores_simd(blocks, b, lut, q, out, np.int64(thr))
    else:
        block_scores = block_scores_scalar

    @kernel
    def block_scores_group(blocks, b, lut, q0, out, thr, masks):
        """``block_scores`` of queries q0 .. q0 + GROUP - 1 (one at a time)."""
        for t in range(GROUP):
            masks[t] = block_scores(blocks, b, lut, q0 + t, out[t], thr[t])


@kernel
def block_scores_all(blocks, lut, q, simd):
    """Scores (nb * 32,) uint16 of every block for query q's tables, by the
    SIMD kernel (simd=True, when available) or the scalar one (tests)."""
    nb = blocks.shape[0]
    out = np.empty(nb * BLOCK, np.uint16)
    buf = np.empty(BLOCK, np.uint16)
    for b in range(nb):
        if simd:
            block_scores(blocks, b, lut, q, buf, 0)
        else:
            block_scores_scalar(blocks, b, lut, q, buf, 0)
        out[b * BLOCK:(b + 1) * BLOCK] = buf
    return out


@kernel
def padded_bytes(M):
    """Code bytes per row in the blocked layout: M / 2 rounded up to a
    multiple of ``BYTE_STEP`` (a kernel step's bytes; the padding bytes are
    0 and their tables are 0)."""
    return -(-(M // 2) // BYTE_STEP) * BYTE_STEP


@kernel
def lut_width(M):
    """Bytes of one query's quantized tables of M sub-quantizers."""
    return padded_bytes(M) * LUT_BYTES


def block_codes(blocks: np.ndarray, slots: np.ndarray) -> np.ndarray:
    """(len(slots), Gp) code bytes of the rows in ``slots`` (block * 32 + row
    in block) of ``blocks`` (``layout_blocks``; padding bytes included)."""
    slots = np.asarray(slots, np.int64)
    b, v = slots // BLOCK, slots % BLOCK
    if DWORDS:
        nb, Gp = blocks.shape[0], blocks.shape[1]
        return blocks.reshape(nb, Gp // 4, BLOCK, 4)[b, :, v, :].reshape(slots.size, Gp)
    return blocks[b, :, v]


@kernel
def _quantize_one(Y, q, slot_dim, centT, lut, out, bias_span):
    """Query q's uint8 tables into out[q] (see module doc); lut (M, 16)
    float32 scratch.  One scale for all tables, returned: the widest sum of
    the spans of a code byte's two tables maps to 254, or less when the M
    maxima plus list biases spanning
    ``bias_span`` (residual coarse codes, ``_list_bias``; else 0) could
    overflow the uint16 sums (M > 257, or wide biases)."""
    M = centT.shape[0]
    _coarse_luts(Y, q, slot_dim, centT, lut)
    span = np.float32(0.0)  # the widest pair of tables of one code byte
    total = np.float64(0.0)
    pair = np.float32(0.0)
    for m in range(M):
        lo = lut[m, 0]
        hi = lo
        for c in range(1, 16):
            lo = min(lo, lut[m, c])
            hi = max(hi, lut[m, c])
        for c in range(16):
            lut[m, c] -= lo
        pair = hi - lo if m % 2 == 0 else pair + (hi - lo)
        span = max(span, pair)
        total += hi - lo
    scale = np.float32(0.0)
    if span > 0:
        # a code byte's two entries sum to <= 255 (254 plus two roundings of
        # at most 1/2): the SIMD sums of a byte need no carry; all M entries
        # plus the bias sum to <= 65535
        scale = np.float32(min(254.0 / span, (65535.0 - M) / (total + bias_span)))
    out[q, :] = 0
    for m in range(M):
        base = _table_at(m)
        for c in range(16):
            v = np.uint8(min(np.int32(lut[m, c] * scale + np.float32(0.5)), 255))
            out[q, base + c] = v
            if not DWORDS:  # byte lanes: a copy per 128-bit lane
                out[q, base + 16 + c] = v
    return scale


@kernel
def _raw_range(raw, lists):
    """(min, max) of the probed lists' (``lists`` >= 0) centroid scores
    ``raw``; (0, 0) when none is probed."""
    lo = np.inf
    hi = -np.inf
    for t in range(lists.shape[0]):
        if lists[t] >= 0:
            lo = min(lo, raw[t])
            hi = max(hi, raw[t])
    return (np.float32(lo), np.float32(hi)) if hi >= lo else (np.float32(0.0), np.float32(0.0))


@kernel
def _bias_span(raw, lists):
    """max - min of the probed lists' centroid scores ``raw``."""
    lo, hi = _raw_range(raw, lists)
    return hi - lo


@kernel
def _list_bias(raw, lists, scale, bias):
    """Residual coarse codes score a row <y, c_l> + its code's table sum:
    bias[t] = round((raw[t] - the smallest raw of the probed lists) * scale),
    the list term in the tables' integer units (raw: <y, c_l> of list
    lists[t]; ``scale`` from ``_quantize_one``, which left room for it)."""
    lo, _ = _raw_range(raw, lists)
    for t in range(lists.shape[0]):
        bias[t] = np.int64((raw[t] - lo) * scale + np.float32(0.5)) if lists[t] >= 0 else 0


@kernel
def quantize_luts(Y, slot_dim, centT):
    """(nq, lut_width(M)) uint8 fast-scan tables of queries Y (see module
    doc)."""
    M = centT.shape[0]
    nq = Y.shape[0]
    out = np.empty((nq, lut_width(M)), np.uint8)
    lut = np.empty((M, 16), np.float32)
    for q in range(nq):
        _quantize_one(Y, q, slot_dim, centT, lut, out, np.float32(0.0))
    return out


@kernel
def _kth_largest(vals, cnt, kk, hist):
    """The kk-th largest of vals[:cnt] (uint16; 1 <= kk <= cnt): radix
    select on the high byte, then the low byte.  Each pass counts into four
    interleaved 256-bin histograms (entry j into ``hist[j % 4]``, int32
    (4, 256) scratch): the scores crowd into a few bins, and one histogram's
    increments of the same bin form a dependency chain."""
    hist[:] = 0
    top = 0
    for j in range(cnt):
        h = np.int64(vals[j]) >> 8
        hist[j & 3, h] += 1
        top = max(top, h)
    hb, need = _bin_of_rank(hist, top, kk)
    hist[:] = 0
    top = 0
    for j in range(cnt):
        v = np.int64(vals[j])
        if (v >> 8) == hb:
            hist[j & 3, v & 255] += 1
            top = max(top, v & 255)
    lb, _ = _bin_of_rank(hist, top, need)
    return (hb << 8) | lb


@kernel
def _bin_of_rank(hist, top, need):
    """(bin, rank within it) of the need-th largest entry counted in the
    four interleaved histograms ``hist`` (``_kth_largest``), from bin
    ``top`` (the highest used) down."""
    b = top
    while True:
        c = hist[0, b] + hist[1, b] + hist[2, b] + hist[3, b]
        if c >= need:
            return b, need
        need -= c
        b -= 1


@kernel
def _compact(res_v, res_i, cnt, kk, hist):
    """Keep the best kk of res[:cnt] (score; among equal scores the first
    found) in res[:kk]; returns the kk-th best score."""
    t = _kth_largest(res_v, cnt, kk, hist)
    above = 0
    for j in range(cnt):
        if res_v[j] > t:
            above += 1
    ties = kk - above
    w = 0
    for j in range(cnt):
        v = res_v[j]
        if v > t or (v == t and ties > 0):
            if v == t:
                ties -= 1
            res_v[w] = v
            res_i[w] = res_i[j]
            w += 1
    return t


@kernel
def _scan_pass(blocks, block_ptr, block_fill, lut, q0, nt, lists, bias, kk, thr, step, res_v, res_i, cnt, hist):
    """For each query t < nt (tables lut[q0 + t]): collect the best kk rows
    scoring >= thr[t] over every ``step``-th block of ``lists`` (step 1:
    all) into res_v[t] / res_i[t] (slots, unordered; cnt[t] of them, <= kk
    after ``_finish_pass``), thr[t] rising as the collector fills; a row of
    lists[li] scores its table sum + bias[li] (``bias`` empty: + 0).  The
    queries score each block in turn while it is in cache, ``GROUP`` at a
    time (``block_scores_group``) while that many are left."""
    gbuf = np.empty((GROUP, BLOCK), np.uint16)  # scores, thresholds and masks of a block's queries
    gthr = np.empty(GROUP, np.int64)
    gmask = np.empty(GROUP, np.int64)
    g = 0  # blocks seen, for the stride
    for li in range(lists.shape[0]):
        lst = lists[li]
        if lst < 0:
            continue
        b0, b1 = block_ptr[lst], block_ptr[lst + 1]
        if b0 == b1:
            continue
        if step == 1:
            # the prefetch stream runs PREFETCH blocks ahead, into the next list
            n0, n1 = b1, b1
            if li + 1 < lists.shape[0] and lists[li + 1] >= 0:
                n0, n1 = block_ptr[lists[li + 1]], block_ptr[lists[li + 1] + 1]
            if li == 0 or lists[li - 1] < 0:
                for t in range(b0, min(b0 + PREFETCH, b1)):
                    _prefetch_block(blocks, t)
        first = b0 + (-g) % step
        g += b1 - b0
        add = bias[li] if bias.shape[0] > 0 else 0
        for b in range(first, b1, step):
            if step == 1:
                ahead = b + PREFETCH
                if ahead < b1:
                    _prefetch_block(blocks, ahead)
                elif n0 + ahead - b1 < n1:
                    _prefetch_block(blocks, n0 + ahead - b1)
            elif b + PREFETCH * step < b1:  # a strided sample: the hardware does not follow it
                _prefetch_block(blocks, b + PREFETCH * step)
            fill = BLOCK if b + 1 < b1 else block_fill[lst]  # padding slots: only in a list's last block
            keep = (np.int64(1) << fill) - 1
            t = 0
            while t < nt:
                ng = GROUP if GROUP > 1 and nt - t >= GROUP else 1
                if ng > 1:
                    for u in range(GROUP):
                        gthr[u] = max(thr[t + u] - add, 0)
                    block_scores_group(blocks, b, lut, q0 + t, gbuf, gthr, gmask)
                else:
                    gmask[0] = block_scores(blocks, b, lut, q0 + t, gbuf[0], max(thr[t] - add, 0))
                for u in range(ng):
                    mask = gmask[u] & keep
                    if mask == 0:
                        continue
                    # slots (block * 32 + row in block): rows are looked up at the end
                    c = _append_passing(gbuf[u], mask, b * BLOCK, res_v[t + u], res_i[t + u], cnt[t + u], add)
                    if c > BUFFER * kk:
                        thr[t + u] = min(np.int64(_compact(res_v[t + u], res_i[t + u], c, kk, hist)) + 1, 65535)
                        c = kk
                    cnt[t + u] = c
                t += ng


@kernel
def _finish_pass(res_v, res_i, cnt, kk, hist):
    """(count <= kk, kk-th best score or -1 when fewer than kk passed) of a
    query's collector after ``_scan_pass``, its best kk kept."""
    if cnt < kk:
        return cnt, -1
    return kk, np.int64(_compact(res_v, res_i, cnt, kk, hist))


@kernel
def _scan_one(blocks, block_rows, block_ptr, block_fill, lut, q, lists, bias, kk, out_i, out_v):
    """The kk rows of query q's best quantized scores over the blocks of
    ``lists`` into out_i, their scores into out_v (uint16): ``_scan_tile``
    of one query."""
    oi = np.empty((1, kk), np.int64)
    ov = np.empty((1, kk), np.uint16)
    _scan_tile(blocks, block_rows, block_ptr, block_fill, lut, q, 1, lists, bias, kk, oi, ov)
    for j in range(kk):
        out_i[j] = oi[0, j]
        out_v[j] = ov[0, j]


@kernel
def _rows_of_slots(res_v, res_i, c, block_rows, out_i, out_v):
    """The collector's first c slots as rows into out_i (scores into out_v),
    -1 (and 0) after them."""
    for j in range(c):
        out_i[j] = block_rows[res_i[j]]
        out_v[j] = res_v[j]
    for j in range(c, out_i.shape[0]):
        out_i[j] = -1
        out_v[j] = 0


@kernel
def _sample_rank(kk):
    """Rank within the sample (``_scan_tile``) of a query's first threshold:
    lam + 3 sqrt(lam) + 1, lam = kk / SAMPLE_STEP the expected number of its
    kk best rows among the sampled ones.  Fewer than kk rows reach that
    threshold (the scan is repeated) only when the sample holds more than
    3 standard deviations above lam of them: for the binomial count of a
    random sample, 0.05-0.17% of queries at kk from 32 to 4,000.  (Rank
    2 lam would rescan 11% of them at kk = 40: npm MiniLM 50k, tiles of
    12, 51 us per query against 43.)"""
    lam = kk / SAMPLE_STEP
    return np.int64(np.ceil(lam + 3.0 * np.sqrt(lam))) + 1


@kernel
def _scan_tile(blocks, block_rows, block_ptr, block_fill, lut, q0, nt, lists, bias, kk, out_i, out_v):
    """For each query t < nt (tables lut[q0 + t]) the kk rows of its best
    quantized scores over the blocks of ``lists`` into out_i[t], their
    scores into out_v[t] (uint16), unordered (-1 and 0 padded; among equal
    scores at the cut, the first scanned).  One pass over the blocks scores
    each for every query while it is in cache (``_scan_pass``; ``bias``:
    per-list score offsets, empty: none).  The collectors hold slots (block
    * 32 + row in block), mapped to rows only for the final kk:
    ``block_rows`` is large and cold, one lookup per passing row cost more
    than the scan.

    With many rows per candidate, a first pass over every SAMPLE_STEP-th
    block sets each query's starting threshold: the ``_sample_rank(kk)``-th
    best score of the sample, so few rows pass and the buffer rarely needs
    cutting.  The result stays exact: a query with fewer than kk rows
    reaching its threshold is scanned again from 0."""
    cap = BUFFER * kk + BLOCK
    res_v = np.empty((nt, cap), np.uint16)
    res_i = np.empty((nt, cap), np.int64)
    cnt = np.zeros(nt, np.int64)
    thr = np.zeros(nt, np.int64)
    start = np.zeros(nt, np.int64)
    hist = np.empty((4, 256), np.int32)
    nblk = 0
    for li in range(lists.shape[0]):
        if lists[li] >= 0:
            nblk += block_ptr[lists[li] + 1] - block_ptr[lists[li]]
    if kk >= SAMPLE_KK and SAMPLE_MIN * kk <= nblk * BLOCK <= SAMPLE_MAX * kk:
        ks = _sample_rank(kk)
        _scan_pass(blocks, block_ptr, block_fill, lut, q0, nt, lists, bias, ks, thr, SAMPLE_STEP, res_v, res_i, cnt,
                   hist)
        for t in range(nt):
            start[t] = max(_finish_pass(res_v[t], res_i[t], cnt[t], ks, hist)[1], 0)
            thr[t] = start[t]
            cnt[t] = 0
    _scan_pass(blocks, block_ptr, block_fill, lut, q0, nt, lists, bias, kk, thr, 1, res_v, res_i, cnt, hist)
    for t in range(nt):
        c, th = _finish_pass(res_v[t], res_i[t], cnt[t], kk, hist)
        if th < 0 and start[t] > 0:  # the sample aimed too high: scan again, keeping everything
            rv = np.empty((1, cap), np.uint16)
            ri = np.empty((1, cap), np.int64)
            c1 = np.zeros(1, np.int64)
            t1 = np.zeros(1, np.int64)
            _scan_pass(blocks, block_ptr, block_fill, lut, q0 + t, 1, lists, bias, kk, t1, 1, rv, ri, c1, hist)
            c = _finish_pass(rv[0], ri[0], c1[0], kk, hist)[0]
            _rows_of_slots(rv[0], ri[0], c, block_rows, out_i[t], out_v[t])
        else:
            _rows_of_slots(res_v[t], res_i[t], c, block_rows, out_i[t], out_v[t])


@kernel
def scan_tables_topk(blocks, block_rows, block_ptr, block_fill, lut, probes, kk, bias):
    """``scan_topk`` with given uint8 tables ``lut`` (nq, ...) and per-list
    score offsets ``bias`` (nq, nprobe) int64 (a row of list probes[q, t]
    scores its table sum + bias[q, t]; (0, 0): none) (tests)."""
    nq = probes.shape[0]
    out = np.empty((nq, kk), np.int64)
    vals = np.empty((nq, kk), np.uint16)
    nobias = np.zeros(0, np.int64)
    for q in range(nq):
        _scan_one(blocks, block_rows, block_ptr, block_fill, lut, q, probes[q],
                  bias[q] if bias.shape[0] > 0 else nobias, kk, out[q], vals[q])
    return out


@kernel
def _scan_query(Y, q, slot_dim, centT, blocks, block_rows, block_ptr, block_fill, probes, raw, kk, out, vals):
    """Tables and scan of query q (``scan_topk``)."""
    M = centT.shape[0]
    lut = np.empty((1, lut_width(M)), np.uint8)
    scratch = np.empty((M, 16), np.float32)
    if raw.shape[0] > 0:
        scale = _quantize_one(Y[q:q + 1], 0, slot_dim, centT, scratch, lut, _bias_span(raw[q], probes[q]))
        bias = np.empty(probes.shape[1], np.int64)
        _list_bias(raw[q], probes[q], scale, bias)
    else:
        _quantize_one(Y[q:q + 1], 0, slot_dim, centT, scratch, lut, np.float32(0.0))
        bias = np.zeros(0, np.int64)
    _scan_one(blocks, block_rows, block_ptr, block_fill, lut, 0, probes[q], bias, kk, out[q], vals[q])


@kernel
def scan_topk(Y, slot_dim, centT, blocks, block_rows, block_ptr, block_fill, probes, raw, kk):
    """(nq, kk) rows of the best coarse scores of queries Y (nq, d) (tables
    from ``quantize_luts``) over the blocks of their lists ``probes`` (nq,
    nprobe) (-1 entries skipped; a flat index is one list), in no particular
    order (see ``_scan_one``), -1 padded, and their quantized scores (uint16,
    0 padded).  ``raw`` (nq, nprobe) float32:
    the probed lists' centroid scores <y, c_l> for residual coarse codes
    (``_list_bias``); (0, 0): direct codes."""
    nq = probes.shape[0]
    out = np.empty((nq, kk), np.int64)
    vals = np.empty((nq, kk), np.uint16)
    for q in range(nq):
        _scan_query(Y, q, slot_dim, centT, blocks, block_rows, block_ptr, block_fill, probes, raw, kk, out, vals)
    return out, vals


@kernel
def scan_query_serial(Q, R, mean, slot_dim, centT, blocks, block_rows, block_ptr, block_fill, dims, Ct,
                      spread, nprobe, resid, ncand, depth, levels, fields, cl, tabs, codes, scales, kk, plan, ids, V,
                      k):
    """The whole single-thread search of a few queries in one call (flat:
    one list, ``Ct`` None and ``nprobe`` = 0; IVF: the ``nprobe`` lists of the
    largest probe scores, ``_probe_tile`` with ``dims``, ``Ct``, ``spread``;
    ``nprobe`` = 0 scans every list; ``resid``: residual coarse codes, a
    row of list l scores <y, c_l> + its table sum, ``_list_bias``; needs
    nprobe > 0): rotate (``R`` (d, d); (0, 0): none;
    (d, m): the leading m transformed dimensions alone, enough when no ADC
    of the candidates follows and the coarse tables and probes read no
    others; the rest stay 0; a tile of queries at a time, ``rotate_tile``,
    with their probes, ``probe.probe_tile_rows``), then the candidates: the
    ``ncand`` best coarse scores (uint8 tables, ``_scan_tile``: a tile of
    queries at a time when every query scans every list, nprobe = 0, else
    one query), or
    with ``ncand`` = 0 every row of the lists (``block_rows``; no coarse
    codes needed), then (a filter passes a layout of its allowed rows alone)
    (``plan``, ``rerank.PLAN_*``)

    - PLAN_FIELDS / PLAN_TABLES: full ADC of those rows, field by field or
      through lookup tables (``tabs``; ``rerank.rescore_more``), top-kk,
      plus <q, mean> (float64): inner-product estimates;
    - PLAN_CAND (with ``V`` only): SIMD candidate ADC (``cl``:
      ``Encoder.candidate_layout``), top-kk;
    - PLAN_NONE (with ``V`` only): every candidate to the exact re-rank;

    then, when ``V`` (the stored copy: float32 rows or float16 bit patterns
    as uint16) has rows, the exact top-k of those rows (``rescore_more``).
    With ``depth`` > 0 the candidates grow per query until they reach
    ``depth`` times the coarse rank of the deepest of the k results
    (``_rescore_candidates``).

    Returns (scores float32, rows int64, out_ids int64), each (nq, width)
    (width k if re-ranked, else kk); out_ids =
    ids[rows], -1 (score -inf) for empty slots.  Raises ValueError when Q
    holds NaN or inf (``IndexBase._prepared_call`` leaves that check to
    this call)."""
    out_v, out_r, out_ids, exact = search_outputs(Q, V, plan == PLAN_FIELDS or plan == PLAN_TABLES, k, kk, ncand)
    nq, d = Q.shape
    Y = np.zeros((1, d), np.float32)
    M = centT.shape[0]
    lut = np.empty((1, lut_width(M)), np.uint8)
    scratch = np.empty((M, 16), np.float32)
    T = np.empty((1 if plan == PLAN_TABLES else 0, codes.shape[1], 256), np.float32)
    nlist = block_ptr.shape[0] - 1
    lists = np.arange(nlist) if nprobe == 0 else np.empty(nprobe, np.int64)
    nacc = 0
    if Ct is not None:  # a flat index passes None: its build compiles no probe
        nacc = Ct.shape[1]
    pv = np.empty(max(nprobe, 1), np.float32)
    raw = np.empty(nprobe if resid else 0, np.float32)
    bias = np.empty(nprobe if resid else 0, np.int64)
    hv = np.empty(kk, np.float32)  # ADC top-kk before an exact re-rank
    hr = np.empty(kk, np.int64)
    # queries that scan every list share the pass over the blocks, a tile at a time
    tile = 1
    if nprobe == 0 and ncand > 0:
        tile = max(1, min(nq, TILE_QUERIES, TILE_TABLE_BYTES // lut.shape[1]))
        if tile > GROUP:  # whole groups (``block_scores_group``)
            tile -= tile % GROUP
    size = _pool_size(block_ptr, lists, ncand, depth)[1] if tile > 1 else 0  # else the probe fills ``lists``
    # the rotations (and the probes) of a tile of queries at once: the matrices are read once for it
    qt = tile
    probing = False
    if Ct is not None:  # a flat index passes None: its build compiles no probe
        probing = nprobe > 0
        if probing:
            qt = probe_tile_rows(nq, nacc)
    Yt = np.zeros((qt, d), np.float32)
    acc_t = np.empty((qt if probing else 0, nacc), np.float32)
    lists_t = np.empty((qt if probing else 0, nprobe), np.int64)
    raw_t = np.empty((qt if probing else 0, raw.shape[0]), np.float32)
    luts = np.empty((tile if tile > 1 else 0, lut.shape[1]), np.uint8)
    pool_i = np.empty((tile if tile > 1 else 0, size), np.int64)
    pool_v = np.empty((tile if tile > 1 else 0, size), np.uint16)
    no_i = np.empty((1, 0), np.int64)
    no_v = np.empty((1, 0), np.uint16)
    for q0 in range(0, nq, qt):
        nt = min(qt, nq - q0)
        rotate_tile(Q, q0, nt, R, Yt)
        if Ct is not None:
            if probing:
                _probe_tile(Yt, nt, dims, Ct, spread, acc_t, pv, lists_t, Q, q0, raw_t)
        if tile > 1:  # the tile's tables, then one scan for all of them
            for t in range(nt):
                _quantize_one(Yt, t, slot_dim, centT, scratch, luts, np.float32(0.0))
            _scan_tile(blocks, block_rows, block_ptr, block_fill, luts, 0, nt, lists, bias, size, pool_i, pool_v)
        for t in range(nt):
            qi = q0 + t
            for j in range(d):
                Y[0, j] = Yt[t, j]
            if probing:
                for j in range(nprobe):
                    lists[j] = lists_t[t, j]
                for j in range(raw.shape[0]):
                    raw[j] = raw_t[t, j]
            if tile == 1:
                if ncand > 0:
                    if resid:
                        scale = _quantize_one(Y, 0, slot_dim, centT, scratch, lut, _bias_span(raw, lists))
                        _list_bias(raw, lists, scale, bias)
                    else:
                        _quantize_one(Y, 0, slot_dim, centT, scratch, lut, np.float32(0.0))
            first_i = pool_i[t] if tile > 1 else no_i[0]
            first_v = pool_v[t] if tile > 1 else no_v[0]
            tabs_q, row_q = (luts, t) if tile > 1 else (lut, 0)  # a deeper pool is scanned with these tables
            _rescore_candidates(blocks, block_rows, block_ptr, block_fill, tabs_q, row_q, lists, bias, ncand, depth,
                                k, Y, Q, qi, mean, levels, fields, cl, tabs, T, codes, scales, plan, V, hv, hr,
                                out_v[qi], out_r[qi], first_i, first_v)
            ids_of_rows_one(out_v[qi], out_r[qi], out_ids[qi], ids)
    return out_v, out_r, out_ids


@kernel
def _pool_size(block_ptr, lists, ncand, depth):
    """(slots of the lists, rows of a query's first candidate pool): ncand,
    or ceil(depth * ncand) with ``depth`` > 0, at most every slot
    (``_rescore_candidates``)."""
    slots = 0  # the pool never needs more: it then holds every row of the lists
    for li in range(lists.shape[0]):
        if lists[li] >= 0:
            slots += (block_ptr[lists[li] + 1] - block_ptr[lists[li]]) * BLOCK
    size = ncand
    if depth > 0:
        size = min(max(ncand, np.int64(np.ceil(min(depth * ncand, 1e15)))), max(slots, ncand))
    return slots, size


@kernel
def _rescore_candidates(blocks, block_rows, block_ptr, block_fill, lut, lq, lists, bias, ncand, depth, k, Y, Q, qi,
                        mean, levels, fields, cl, tabs, T, codes, scales, plan, V, hv, hr, out_v, out_r, first_i,
                        first_v):
    """Query qi's candidates rescored (``rescore_more`` into out_v, out_r;
    its only call in the scan kernel: one build of it), its coarse tables
    lut[lq].  ``ncand`` = 0: every row of the lists, one band.  Else the scan keeps a pool of the
    best coarse scores (``_scan_tile``: ncand rows, or ceil(depth * ncand)
    with ``depth`` > 0) whose best m rows are rescored (m = ncand first,
    ``_best_of``).  With ``depth`` > 0 the result stands once m >= depth *
    r, r the coarse rank within the pool of the deepest of the first k
    results (``_needed``); else m grows to max(depth * r, 2 m) and the next
    rows of the pool are rescored; a pool too small for m is scanned again,
    at least twice as large (its best m rows rescored anew).  A pool that
    holds every row of the lists ends it (all of them rescored).
    ``first_i`` / ``first_v``: the first pool when a tile scan found it
    (``_scan_tile``; empty: scanned here)."""
    slots, size = _pool_size(block_ptr, lists, ncand, depth)
    tiled = ncand > 0 and first_i.shape[0] == size
    hist = np.empty((4, 256), np.int32)
    m = ncand
    scan = ncand > 0  # a pool to scan before the next band
    rows = np.empty((1, 0), np.int64)
    pool = rows[0]
    pool_v = np.empty(0, np.uint16)
    taken = np.zeros(0, np.int64)
    cnt = 0
    full = True
    first = True
    while True:
        if ncand == 0:
            band = _list_rows(block_rows, block_ptr, lists)
        else:
            if scan:
                full = size >= slots
                rows = np.empty((1, size), np.int64)
                rows_v = np.empty((1, size), np.uint16)
                pool = rows[0]
                pool_v = rows_v[0]
                if tiled:  # the tile's scan
                    for j in range(size):
                        pool[j] = first_i[j]
                        pool_v[j] = first_v[j]
                    tiled = False
                else:  # a tile of this query alone
                    _scan_tile(blocks, block_rows, block_ptr, block_fill, lut, lq, 1, lists, bias, size, rows, rows_v)
                if depth > 0:  # a fixed pool is rescored as it is
                    cnt = 0
                    while cnt < size and pool[cnt] >= 0:
                        cnt += 1
                    taken = np.zeros(cnt, np.int64)
                first = True
                scan = False
            band = rows if depth == 0 else _band(pool, taken, _best_of(pool_v, cnt, min(m, cnt), hist))
        rescore_more(Y, Q, qi, mean, levels, fields, cl, tabs, T, codes, scales, band, plan, V, hv, hr, out_v, out_r,
                     first)
        first = False
        if ncand == 0 or depth == 0:
            return
        need = _needed(pool, pool_v, taken, out_r, k, depth)
        if need <= m or m >= cnt and (cnt < size or full):
            return  # deep enough, or every row of the lists rescored
        m = max(need, 2 * m)
        if m > cnt and not full:
            size = min(max(m, 2 * size), slots)  # the pool is too small: scan again
            scan = True
        else:
            m = min(m, cnt)


@kernel
def _band(pool, taken, pos):
    """(1, c) the pool rows at positions ``pos`` not rescored yet (then
    marked ``taken``), in pool order."""
    nb = 0
    for t in range(pos.shape[0]):
        if not taken[pos[t]]:
            nb += 1
    band = np.empty((1, nb), np.int64)
    nb = 0
    for t in range(pos.shape[0]):
        if not taken[pos[t]]:
            taken[pos[t]] = 1
            band[0, nb] = pool[pos[t]]
            nb += 1
    return band


@kernel
def _best_of(pool_v, cnt, m, hist):
    """Positions of the m best of the pool's first cnt scores (ties at the
    cut: the first in pool order), in pool order.  The best m are among the
    best m' >= m (nested, ``_rescore_candidates``)."""
    pos = np.empty(m, np.int64)
    if m == 0:
        return pos
    t = np.int64(_kth_largest(pool_v, cnt, m, hist)) if m < cnt else np.int64(0)
    above = 0
    for j in range(cnt):
        if np.int64(pool_v[j]) > t:
            above += 1
    ties = m - above
    w = 0
    for j in range(cnt):
        v = np.int64(pool_v[j])
        if v > t or (v == t and ties > 0):
            if v == t:
                ties -= 1
            pos[w] = j
            w += 1
    return pos


@kernel
def _needed(pool, pool_v, taken, out_r, k, depth):
    """ceil(depth * r), r the coarse rank of the deepest of the first k
    result rows ``out_r`` among the rescored pool rows (``taken``): how many
    of the pool's scores reach its score (ties count); 0 when no result row
    is set."""
    cap = 2
    while cap < 2 * k:
        cap *= 2
    table = np.full(cap, -1, np.int64)  # the result rows, open addressing (O(pool + k), not O(pool k))
    for j in range(k):
        if out_r[j] >= 0:
            h = _slot(out_r[j], cap)
            while table[h] >= 0 and table[h] != out_r[j]:
                h = (h + 1) & (cap - 1)
            table[h] = out_r[j]
    deepest = np.int64(65536)
    cnt = taken.shape[0]
    for t in range(cnt):
        if taken[t]:
            r = pool[t]
            h = _slot(r, cap)
            while table[h] >= 0:
                if table[h] == r:
                    deepest = min(deepest, np.int64(pool_v[t]))
                    break
                h = (h + 1) & (cap - 1)
    if deepest == 65536:
        return 0
    rank = 0
    for t in range(cnt):
        if np.int64(pool_v[t]) >= deepest:
            rank += 1
    return np.int64(np.ceil(min(depth * rank, 1e15)))


@kernel
def _slot(r, cap):
    """Fibonacci hash of row r into 0..cap-1 (cap a power of two)."""
    return np.int64((np.uint64(r) * np.uint64(11400714819323198485)) >> np.uint64(40)) & (cap - 1)


@kernel
def _list_rows(block_rows, block_ptr, lists):
    """(1, slots) rows of the blocks of ``lists`` (-1 entries skipped;
    padding slots -1): the candidates of a search without a coarse scan."""
    n = 0
    for li in range(lists.shape[0]):
        if lists[li] >= 0:
            n += block_ptr[lists[li] + 1] - block_ptr[lists[li]]
    rows = np.empty((1, n * BLOCK), np.int64)
    w = 0
    for li in range(lists.shape[0]):
        if lists[li] >= 0:
            for s in range(block_ptr[lists[li]] * BLOCK, block_ptr[lists[li] + 1] * BLOCK):
                rows[0, w] = block_rows[s]
                w += 1
    return rows


def layout_blocks(packed: np.ndarray, ptr: np.ndarray, order: np.ndarray):
    """Blocked layout of coarse codes ``packed`` (n, G) uint8 for lists in
    CSR form (list l holds rows ``order[ptr[l]:ptr[l+1]]``): returns
    ``blocks`` (nb, padded_bytes(2 G), 32) uint8 (module doc: the order
    of a block's bytes depends on the CPU; ``block_codes`` reads rows
    back), ``block_rows`` (nb * 32,) int64 (-1:
    padding), ``block_ptr`` (nlist + 1,) int64 (list l = blocks
    block_ptr[l]:block_ptr[l+1]) and ``block_fill`` (nlist,) int64 (rows in
    list l's last block; padding slots come only there)."""
    packed = np.ascontiguousarray(packed, np.uint8)
    ptr = np.asarray(ptr, np.int64)
    order = np.asarray(order, np.int64)
    sizes = np.diff(ptr)
    nblk = -(-sizes // BLOCK)
    block_ptr = np.zeros(ptr.size, np.int64)
    np.cumsum(nblk, out=block_ptr[1:])
    nb = int(block_ptr[-1])
    slot_rows = np.full(nb * BLOCK, -1, np.int64)
    # slot of each list member: the list's first slot + its rank in the list
    list_of = np.repeat(np.arange(sizes.size), sizes)
    rank = np.arange(order.size) - ptr[list_of]
    slot_rows[block_ptr[list_of] * BLOCK + rank] = order
    G = packed.shape[1]
    Gp = int(padded_bytes(2 * G))
    blocks = np.zeros((nb * BLOCK, Gp), np.uint8)
    valid = slot_rows >= 0
    blocks[valid, :G] = packed[slot_rows[valid]]
    if DWORDS:  # bytes 4j..4j+3 of row v at 128 j + 4 v in its block
        blocks = blocks.reshape(nb, BLOCK, Gp // 4, 4).transpose(0, 2, 1, 3).reshape(nb, Gp, BLOCK)
    else:  # byte g of row v at 32 g + v
        blocks = blocks.reshape(nb, BLOCK, Gp).transpose(0, 2, 1)
    blocks = np.ascontiguousarray(blocks)
    block_fill = sizes - (nblk - 1) * BLOCK
    return blocks, slot_rows, block_ptr, block_fill
