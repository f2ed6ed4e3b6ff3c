"""Numba CPU backend: the whole forward, loss, BPTT, clipping and optimizer
update as compiled kernels.

Design (see DESIGN.md):
- Parameters are one flat array; ``cfg`` (int64) carries dimensions, flags
  and the offsets of every parameter block, ``fcfg`` (float64) the numbers of
  the optimizer and the clipping. A kernel takes a handful of arrays.
- All scratch lives in one flat workspace ``ws`` that the caller keeps
  between calls (no page faults from fresh allocations); ``_sections`` is the
  single table of its section sizes and ``_section`` cuts it into views.
- The input projection W_ih x for all T*B rows is one product before the time
  loop (a row gather for token ids); the time loop keeps only the recurrence;
  dW_ih, dW_hh are one product each after the backward loop.
- Two cores (or more): batch rows are independent in the recurrence, so they
  are split into chunks (``_forward_chunks``/``_backward_chunks``, prange)
  that each run the whole time loop on their own core with no per-step
  synchronisation. The one-off products (projection, weight gradients as
  partial sums, input gradient, read-out) are split too (``_pmm*``). BLAS is
  pinned to one thread during kernel calls (``_BlasThreads``) so its thread
  pool and numba's do not oversubscribe the cores; at B = 1 nothing is split
  and BLAS keeps its threads.
- The per-step recurrent product is a register-blocked loop (4 rows share
  each row of W_hh; no transpose) up to SMALL_MACS on one chunk and always
  inside chunks (CHUNK_MACS), BLAS beyond.
- Optional Intel MKL (the `mkl` extra, backends/_mkl.py; FASTRNN_MKL=0
  turns it off, =1 requires it): inside chunks, the per-step products call
  cblas_?gemm (or the packed API, MKL_PACKED) where it measured faster than
  the loops (``mkl_paths``: chunks of >= 8 rows). The kernels get MKL's
  function addresses as int64 numbers in cfg and call them through
  intrinsics, so numba's on-disk cache keeps working; each chunk sets MKL
  to one thread for its own thread.
- Derivatives come from saved outputs (tanh' = 1 - h^2, sigmoid' = s(1-s)).
- Float32 activations run once per step over whole blocks with a vectorised
  exp-based form (``_act_block``, ``_expm1_f32_row``) within a few float32
  ulps, NaN propagating; float64 uses libm and stays within 1e-9 of NumPy.

Shapes inside the kernels:
  x: (T*B, I) float (empty when token ids are given), tok: (T*B,) int64
  lengths: (B,) int64, state0/state_n: (S, L*D, B, H)
  W_ih: (G*H, I_k), W_hh: (G*H, H), b_ih, b_hh: (G*H,)
  HX (per layer/direction): (T+2, B, H); h_t is at HX[t+1], h0 at HX[0]
  (forward direction) or HX[T+1] (reverse direction)
"""
import math
import os

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from . import _mkl, ctx_state

name = "numba"

# ---- cfg header indices ----------------------------------------------------
C_T, C_B, C_I, C_H, C_L, C_D, C_MODE, C_BIAS, C_TOK, C_O, C_READOUT, C_LOSS, \
    C_OPT, C_CLIP, C_SCLIP, C_STEP, C_FAST, C_SMALL, C_WOUT, C_BOUT, C_NC, \
    C_NCG, C_PAR, C_MKL, C_MKL_GEMM, C_MKL_PACK, C_MKL_COMP, C_MKL_PACKN, \
    C_MKL_LOCAL = range(29)
C_POFF = 32            # poff (L*D, 4) flattened from here
# cfg[C_MKL:C_MKL + 6] is what the recurrences get of MKL ("mk"): flags (which
# products call MKL), the addresses of cblas_?gemm, cblas_?gemm_pack,
# cblas_?gemm_compute for the dtype, the size (elements) of one chunk's slot
# in the workspace section PACK, the address of MKL_Set_Num_Threads_Local.
MK_FWD, MK_BWD, MK_PACKED = 1, 2, 4
# ---- fcfg indices ----------------------------------------------------------
F_LR, F_MOM, F_B1, F_B2, F_EPS, F_LIMIT, F_SCLIP = range(7)
# ---- result indices --------------------------------------------------------
R_LOSS, R_GNORM, R_CLIPPED, R_SKIPPED = range(4)

LSTM = 3
# per-step products with at most this many multiply-adds run as explicit
# loops; larger ones call BLAS. Measured on the 2-core AVX2 dev machine
# (benchmarks/crossover.py).
SMALL_MACS = 32768
# inside a chunk of batch rows (one core each, BLAS pinned to one thread) the
# register-blocked loops beat single-threaded OpenBLAS at every benchmarked
# shape (~60 vs ~35 GFLOP/s at 8x128x512; LSTM B=16, H=512: 102 ms with the
# loops, 199 ms with BLAS per chunk), so chunks always use the loops.
CHUNK_MACS = 1 << 62
# at most this many chunks of batch rows / of a one-off product
MAX_SPLIT = 4


# ---- the GEMM engine of the per-step products ------------------------------
# FASTRNN_MKL: unset/"auto" uses MKL when it loads (the `mkl` extra), "0"
# never, "1" requires it (the first kernel call raises if it is missing).
_MKL_ENV = os.environ.get("FASTRNN_MKL", "").strip().lower()
_MKL_OFF = _MKL_ENV in ("0", "false", "no", "off")
_MKL_REQUIRED = _MKL_ENV in ("1", "true", "yes", "on")
_MKL_ENV_BAD = not (_MKL_OFF or _MKL_REQUIRED or _MKL_ENV in ("", "auto"))
if _MKL_OFF or _MKL_ENV_BAD:
    _MKL, _MKL_WHY = None, f"FASTRNN_MKL={os.environ.get('FASTRNN_MKL')}"
else:
    _ok, _MKL_WHY = _mkl.status()
    _MKL = _mkl.load() if _ok else None
# "mkl" or "default" (register-blocked loops and OpenBLAS); set_gemm changes it
_GEMM = "mkl" if _MKL is not None else "default"
# With the engine "mkl", the per-step products of the chunked recurrences
# (one core each, B >= 2) call MKL where it measured faster than the
# register-blocked loops on the 2-core AMD EPYC dev machine, by the chunk's
# batch rows m, H and the gate count G (benchmarks/results/mkl_crossover.txt:
# both chunks at once, T=100, LSTM and RNN shapes, aligned arrays). Below 8
# rows the loops win everywhere.
#   forward  h_{t-1} W_hh^T: MKL at m >= 8 with H <= 64 (LSTM H=32, m=32:
#            127 against 66 GFLOP/s over 2 cores), and at m >= 32 while
#            G*H*H <= 65536 (LSTM H <= 128, RNN H <= 256); the loops beyond
#            (LSTM H = 512: 140 against 109-119).
#   backward dgates W_hh:    MKL at m >= 16 (103-138 against 75-98), and at
#            m = 8..15 while G*H*H <= 4096 (LSTM H <= 32, RNN H <= 64); a
#            tie or worse in the whole training step at m = 8 beyond (LSTM
#            H = 128: 0-6% slower with it over three runs, RNN H = 128: 2%).
# The one-off products stay on OpenBLAS: single-threaded it ran them at
# 55-92 GFLOP/s, MKL at 27-78 (the weight gradient 3200 x 2048 x 512: 88
# against 71). The packed API (W_hh packed once per call, reused for the T
# steps) measured no better than plain ?gemm here (within +-10%, worse at
# H = 512), so it is off by default; MKL_PACKED = True turns it on.
MKL_PACKED = False
# tests: force these MK_* flags at every split shape (None: the rules above)
MKL_FORCE = None


def mkl_paths(m, H, G):
    """MK_* flags: which per-step products use MKL for chunks of m rows
    (G = 4 for the LSTM, 1 for the RNN)."""
    if MKL_FORCE is not None:
        return MKL_FORCE
    f = 0
    if (m >= 8 and H <= 64) or (m >= 32 and G * H * H <= 65536):
        f |= MK_FWD
    if m >= 16 or (m >= 8 and G * H * H <= 4096):
        f |= MK_BWD
    if f and MKL_PACKED:
        f |= MK_PACKED
    return f


def set_gemm(engine):
    """Choose the engine of the per-step products for this process: "mkl"
    or "default" (built-in loops, OpenBLAS); returns the previous one.
    "mkl" raises RuntimeError when MKL is not usable."""
    global _GEMM
    if engine not in ("mkl", "default"):
        raise ValueError(f"engine: expected 'mkl' or 'default', got {engine!r}")
    if engine == "mkl" and _MKL is None:
        raise RuntimeError(f"MKL is not usable: {_MKL_WHY}")
    prev, _GEMM = _GEMM, engine
    return prev


def gemm_engine():
    """'mkl (packed)', 'mkl' or 'default': the engine of the per-step
    products (MKL where mkl_paths says so, the loops elsewhere)."""
    if _GEMM == "mkl":
        return "mkl (packed)" if MKL_PACKED else "mkl"
    return "default"


def available():
    if _GEMM == "mkl":
        gemm = (f"gemm: {gemm_engine()} for the per-step products of batch "
                "chunks of >= 8 rows where it measured faster, built-in loops "
                f"and OpenBLAS for the rest [{_MKL.describe()}]")
    elif _MKL_REQUIRED:
        gemm = f"gemm: MKL required (FASTRNN_MKL=1) but not usable: {_MKL_WHY}"
    else:
        gemm = f"gemm: built-in loops and OpenBLAS (MKL not used: {_MKL_WHY})"
    return True, "numba imported; " + gemm


# ============================================================================
# workspace
# ============================================================================
@njit(cache=True)
def _sections(T, B, I, H, L, D, G, O, lstm, tok, ncg, npack):
    """Sizes (in elements) of the workspace sections, in order."""
    W = max(I, D * H)
    s = np.zeros(18, dtype=np.int64)
    s[0] = L * D * (T + 2) * B * H            # HX: hidden states
    s[1] = L * D * (T + 2) * B * H * lstm     # CX: cell states
    s[2] = L * D * T * B * G * H * lstm       # GATES: i, f, g, o activations
    s[3] = L * D * T * B * H * lstm           # TANHC: tanh(c_t)
    s[4] = L * T * B * D * H                  # LOUT: layer outputs
    s[5] = T * B * G * H                      # DELTA: dL/da_t, one direction
    s[6] = T * B * W                          # DA: d layer output
    s[7] = T * B * W                          # DB: d layer input
    s[8] = T * B * W                          # TMP: product scratch
    s[9] = (ncg - 1) * max(G * H * max(H, I, D * H), O * D * H)  # PART: partial products
    s[10] = 2 * B * H                         # DH: dh, dc carried back
    s[11] = I * G * H * tok                   # WT: W_ih transposed, token ids
    s[12] = I * G * H * tok                   # DWT: token-gradient rows
    s[13] = T * B * O                         # Z: read-out
    s[14] = T * B * O                         # DZ
    s[15] = B * D * H                         # HLAST
    s[16] = 2 * T * B * O                     # ZS: exp scratch of the loss
    s[17] = npack                             # PACK: MKL packed W_hh, per chunk
    return s


@njit(cache=True)
def _section(ws, sizes, j):
    """Section j of the workspace; every section starts at a multiple of
    16 elements (64 bytes of float32 from the aligned base, see _prepare)."""
    off = 0
    for i in range(j):
        off += (sizes[i] + 15) // 16 * 16
    return ws[off:off + sizes[j]]


def workspace_size(T, B, I, H, L, D, G, O, lstm, tok, ncg, npack=0):
    s = _sections(T, B, I, H, L, D, G, O, lstm, tok, ncg, npack)
    return int(((s + 15) // 16 * 16).sum())


# The workspace starts on a 64-byte boundary (0: wherever numpy puts it,
# 16 bytes past one for large arrays here). The register-blocked per-step
# loops read the state rows with 32-byte AVX2 loads: with the rows 16 bytes
# off, the LSTM forward product (B=64, H=512) took 122 ms instead of 96.
WS_ALIGN = 64


def _aligned_zeros(n, dtype, align):
    """np.zeros(n, dtype) whose data starts at a multiple of `align` bytes."""
    dtype = np.dtype(dtype)
    if align <= dtype.itemsize:
        return np.zeros(n, dtype=dtype)
    buf = np.zeros(n + align // dtype.itemsize, dtype=dtype)
    skip = (-buf.ctypes.data % align) // dtype.itemsize
    return buf[skip:skip + n]


# ============================================================================
# activations (pointwise, row-wise, written to vectorise)
# ============================================================================
@njit(cache=True, fastmath={"contract"})
def _expm1_f32_row(v, dst, ibuf):
    """dst = exp(v) - 1 for float32 values |v| <= 87 (NaN propagates).

    exp(v) = 2^k e^r with k = round(v / ln2), r = v - k ln2 (ln2 split in two,
    Cody-Waite) so |r| <= ln2/2; e^r - 1 by its degree-7 Taylor polynomial
    (truncation < 2e-8 relative); 2^k built from its float32 bit pattern.
    Every operation has a packed AVX2 form, so the loops vectorise (~1 ns
    per element instead of ~12 ns for a libm call)."""
    n = v.shape[0]
    for j in range(n):
        x = v[j]
        k = np.floor(x * np.float32(1.4426950408889634) + np.float32(0.5))
        r = x - k * np.float32(0.693359375) - k * np.float32(-2.12194440e-4)
        q = r * (np.float32(1.0) + r * (np.float32(0.5) + r * (
            np.float32(0.16666666666666666) + r * (np.float32(0.041666666666666664) + r * (
                np.float32(0.008333333333333333) + r * (np.float32(0.001388888888888889)
                                                        + r * np.float32(0.0001984126984126984)))))))
        ibuf[j] = (np.int32(k) + np.int32(127)) << np.int32(23)
        dst[j] = q
    f = ibuf[:n].view(np.float32)
    for j in range(n):
        dst[j] = f[j] * dst[j] + (f[j] - np.float32(1.0))


@njit(cache=True, fastmath={"contract"})
def _clamp_scaled(src, s, scale, lim):
    """s = clamp(src * scale, -lim, lim), elementwise; NaN passes through."""
    for j in range(src.shape[0]):
        u = src[j] * scale[j]
        u = lim[j] if u > lim[j] else u
        s[j] = -lim[j] if u < -lim[j] else u


@njit(cache=True)
def _ratio(dst, c1):
    """dst = (1 - c1 + c1 e) / (e + 2) with e = dst: sigmoid where c1 = 0
    (e = expm1(-x)), tanh where c1 = 1 (e = expm1(2x))."""
    for j in range(dst.shape[0]):
        e = dst[j]
        dst[j] = (1 - c1[j] + c1[j] * e) / (e + 2)


@njit(cache=True)
def _act_coefs(mode, n_rows, H, G, dtype):
    """Per-element coefficients (scale, limit, c1) of the activation of a
    (n_rows, G*H) block: tanh columns (scale 2, limit 19, c1 1) and sigmoid
    columns (scale -1, limit 87, c1 0). LSTM rows: i, f sigmoid; g tanh; o
    sigmoid."""
    W = G * H
    co = np.empty((3, n_rows * W), dtype=dtype)
    for r in range(n_rows):
        for j in range(W):
            if mode == LSTM:
                th = j >= 2 * H and j < 3 * H
            else:
                th = mode == 0
            k = r * W + j
            co[0, k] = 2 if th else -1
            co[1, k] = 19 if th else 87
            co[2, k] = 1 if th else 0
    return co


@njit(cache=True)
def _act_block(fast, relu, src, dst, co, s, ibuf):
    """dst = f(src) elementwise over a whole block (1-D views; src may be
    dst), f per element from co (see _act_coefs), or ReLU. NaN propagates.

    fast (float32): clamp, expm1 by _expm1_f32_row, one division; three
    vectorised passes, within a few float32 ulps of NumPy. Otherwise libm
    (float64 stays within 1e-9 of the reference)."""
    n = src.shape[0]
    if relu:
        for j in range(n):
            dst[j] = 0 if src[j] < 0 else src[j]
        return
    if fast:
        sc = s[:n]
        _clamp_scaled(src, sc, co[0, :n], co[1, :n])
        _expm1_f32_row(sc, dst, ibuf)   # distinct arrays: the loop vectorises
        _ratio(dst, co[2, :n])
        return
    c1 = co[2]
    for j in range(n):
        if c1[j] != 0:
            dst[j] = np.tanh(src[j])
        else:
            dst[j] = 1 / (1 + np.exp(-src[j]))


@njit(cache=True)
def _dact_mul_row(mode, h, dh, out):
    """out = f'(a) * dh with f'(a) from h = f(a)."""
    n = h.shape[0]
    if mode == 0:
        for j in range(n):
            out[j] = (1 - h[j] * h[j]) * dh[j]
    elif mode == 1:
        for j in range(n):
            out[j] = dh[j] if h[j] > 0 else 0
    else:
        for j in range(n):
            out[j] = h[j] * (1 - h[j]) * dh[j]


# ============================================================================
# products
# ============================================================================
@njit(cache=True, fastmath={"contract", "reassoc", "nsz"})
def _addmm_nt(A, W, C, tmp, small):
    """C += A @ W.T, A: (M, K), W: (N, K) row-major (W_hh as stored: no
    transpose), C: (M, N). When M*K*N <= small: explicit loops, a vectorised
    dot product per output with 4 rows of A sharing each row of W (register
    blocking: ~60 GFLOP/s on one AVX2 core, more than OpenBLAS at these
    shapes); BLAS otherwise."""
    M, K = A.shape
    N = W.shape[0]
    if M * K * N > small:
        t = tmp[:M * N].reshape((M, N))
        np.dot(A, W.T, t)
        for m in range(M):
            c = C[m]
            tr = t[m]
            for n in range(N):
                c[n] += tr[n]
        return
    m = 0
    while m + 4 <= M:
        a0 = A[m]
        a1 = A[m + 1]
        a2 = A[m + 2]
        a3 = A[m + 3]
        for n in range(N):
            w = W[n]
            s0 = C[m, n]
            s1 = C[m + 1, n]
            s2 = C[m + 2, n]
            s3 = C[m + 3, n]
            for k in range(K):
                wk = w[k]
                s0 += a0[k] * wk
                s1 += a1[k] * wk
                s2 += a2[k] * wk
                s3 += a3[k] * wk
            C[m, n] = s0
            C[m + 1, n] = s1
            C[m + 2, n] = s2
            C[m + 3, n] = s3
        m += 4
    while m < M:
        a = A[m]
        c = C[m]
        for n in range(N):
            w = W[n]
            acc = c[n]
            for k in range(K):
                acc += a[k] * w[k]
            c[n] = acc
        m += 1


@njit(cache=True, fastmath={"contract", "reassoc", "nsz"})
def _mm(A, Bm, C, small):
    """C = A @ Bm, A: (M, K), Bm: (K, N) row-major, C: (M, N) contiguous.
    Explicit loops (4 rows of C share each row of Bm) when M*K*N <= small,
    BLAS straight into C otherwise."""
    M, K = A.shape
    N = Bm.shape[1]
    if M * K * N > small:
        np.dot(A, Bm, C)
        return
    C[:] = 0
    m = 0
    while m + 4 <= M:
        c0 = C[m]
        c1 = C[m + 1]
        c2 = C[m + 2]
        c3 = C[m + 3]
        for k in range(K):
            b = Bm[k]
            x0 = A[m, k]
            x1 = A[m + 1, k]
            x2 = A[m + 2, k]
            x3 = A[m + 3, k]
            for n in range(N):
                bn = b[n]
                c0[n] += x0 * bn
                c1[n] += x1 * bn
                c2[n] += x2 * bn
                c3[n] += x3 * bn
        m += 4
    while m < M:
        c = C[m]
        for k in range(K):
            x = A[m, k]
            b = Bm[k]
            for n in range(N):
                c[n] += x * b[n]
        m += 1


# ---- MKL, called from the kernels through function addresses ---------------
# numba cannot cache a function that embeds a ctypes function pointer as a
# global, so the addresses of the MKL functions (backends/_mkl.py) travel in
# cfg as int64 numbers and are called through these intrinsics (inttoptr +
# call). Sizes are passed as 32-bit ints (MKL's LP64 interface, which _mkl
# sets), alpha and beta in the arrays' precision; layout is row-major.
_CBLAS_ROW_MAJOR = 101
_NO_TRANS, _TRANS, _PACKED = _mkl.NO_TRANS, _mkl.TRANS, _mkl.PACKED
_B_MATRIX = _mkl.B_MATRIX


def _llvm_float(dt):
    return ir.FloatType() if dt == types.float32 else ir.DoubleType()


def _ptr_arg(context, builder, aryty, ary):
    a = context.make_array(aryty)(context, builder, ary)
    return builder.bitcast(a.data, ir.IntType(8).as_pointer())


def _c_call(context, builder, sig, args, kinds, dt):
    """Call the function at address args[0] with the C types of `kinds`
    ('i' int32, 'f' float of dt, 'p' data pointer of an array) for
    args[1:], after the row-major layout constant."""
    i32 = ir.IntType(32)
    fl = _llvm_float(dt)
    vp = ir.IntType(8).as_pointer()
    lty = {"i": i32, "f": fl, "p": vp}
    fnty = ir.FunctionType(ir.VoidType(), [i32] + [lty[k] for k in kinds])
    fn = builder.inttoptr(args[0], fnty.as_pointer())
    vals = [ir.Constant(i32, _CBLAS_ROW_MAJOR)]
    for j, k in enumerate(kinds, start=1):
        if k == "i":
            v = context.cast(builder, args[j], sig.args[j], types.int64)
            vals.append(builder.trunc(v, i32))
        elif k == "f":
            vals.append(context.cast(builder, args[j], sig.args[j], dt))
        else:
            vals.append(_ptr_arg(context, builder, sig.args[j], args[j]))
    builder.call(fn, vals)
    return context.get_dummy_value()


@intrinsic
def _mkl_gemm(typingctx, addr, ta, tb, m, n, k, alpha, A, lda, Bm, ldb, beta,
              C, ldc):
    """cblas_?gemm(RowMajor, ta, tb, m, n, k, alpha, A, lda, Bm, ldb, beta,
    C, ldc) at address addr; A, Bm, C: arrays (their first element)."""
    sig = types.void(addr, ta, tb, m, n, k, alpha, A, lda, Bm, ldb, beta, C,
                     ldc)

    def codegen(context, builder, sig, args):
        return _c_call(context, builder, sig, args, "iiiiifpipifpi", C.dtype)
    return sig, codegen


@intrinsic
def _mkl_pack(typingctx, addr, ident, trans, m, n, k, alpha, src, ld, dest):
    """cblas_?gemm_pack(RowMajor, ident, trans, m, n, k, alpha, src, ld,
    dest) at address addr."""
    sig = types.void(addr, ident, trans, m, n, k, alpha, src, ld, dest)

    def codegen(context, builder, sig, args):
        return _c_call(context, builder, sig, args, "iiiiifpip", src.dtype)
    return sig, codegen


@intrinsic
def _mkl_compute(typingctx, addr, ta, tb, m, n, k, A, lda, Bm, ldb, beta, C,
                 ldc):
    """cblas_?gemm_compute(RowMajor, ta, tb, m, n, k, A, lda, Bm, ldb, beta,
    C, ldc) at address addr (Bm packed when tb is CblasPacked)."""
    sig = types.void(addr, ta, tb, m, n, k, A, lda, Bm, ldb, beta, C, ldc)

    def codegen(context, builder, sig, args):
        return _c_call(context, builder, sig, args, "iiiiipipifpi", C.dtype)
    return sig, codegen


@intrinsic
def _mkl_threads_local(typingctx, addr, n):
    """MKL_Set_Num_Threads_Local(n) at address addr: MKL's thread count for
    the calling thread only (0: back to the global setting); returns the
    previous one."""
    sig = types.int64(addr, n)

    def codegen(context, builder, sig, args):
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(i32, [i32])
        fn = builder.inttoptr(args[0], fnty.as_pointer())
        v = context.cast(builder, args[1], sig.args[1], types.int64)
        r = builder.call(fn, [builder.trunc(v, i32)])
        return builder.sext(r, ir.IntType(64))
    return sig, codegen


@njit(cache=True)
def _mkl_enter(mk):
    """In a chunk (one core): MKL on this thread only, one thread. Returns
    the previous thread-local setting for _mkl_exit."""
    if mk[0] == 0:
        return 0
    return _mkl_threads_local(mk[5], 1)


@njit(cache=True)
def _mkl_exit(mk, prev):
    if mk[0] != 0:
        _mkl_threads_local(mk[5], prev)


@intrinsic
def _data_address(typingctx, A):
    """The address of an array's first element, as int64."""
    sig = types.int64(A)

    def codegen(context, builder, sig, args):
        a = context.make_array(sig.args[0])(context, builder, args[0])
        return builder.ptrtoint(a.data, ir.IntType(64))
    return sig, codegen


@njit(cache=True)
def _pack_slot(pack, mk, c):
    """Chunk c's slot of the workspace section PACK, aligned to 64 bytes."""
    n = mk[4]
    slot = pack[c * n:(c + 1) * n]
    isz = pack.itemsize
    skip = ((64 - _data_address(slot) % 64) % 64) // isz
    return slot[skip:]


@njit(cache=True)
def _mkl_pack_w(mk, W, m, fwd, pbuf):
    """Pack W_hh (GH, H) once for the per-step products of a chunk of m rows:
    forward as op(B) = W_hh.T (C += A @ W_hh.T), backward as op(B) = W_hh
    (C = A @ W_hh). Nothing when those products do not use packed MKL."""
    GH, H = W.shape
    if fwd and (mk[0] & MK_FWD) and (mk[0] & MK_PACKED):
        _mkl_pack(mk[2], _B_MATRIX, _TRANS, m, GH, H, 1.0, W, H, pbuf)
    elif not fwd and (mk[0] & MK_BWD) and (mk[0] & MK_PACKED):
        _mkl_pack(mk[2], _B_MATRIX, _NO_TRANS, m, H, GH, 1.0, W, H, pbuf)


@njit(cache=True)
def _step_nt(mk, A, W, C, tmp, small, pbuf):
    """The forward per-step product C += A @ W.T (A: (m, H) rows of h_{t-1},
    W: W_hh (GH, H), C: (m, GH)): MKL (packed W from _mkl_pack_w, or plain
    sgemm) when mk says so, else _addmm_nt."""
    if mk[0] & MK_FWD:
        M, K = A.shape
        N = W.shape[0]
        if mk[0] & MK_PACKED:
            _mkl_compute(mk[3], _NO_TRANS, _PACKED, M, N, K, A, K, pbuf, K,
                         1.0, C, N)
        else:
            _mkl_gemm(mk[1], _NO_TRANS, _TRANS, M, N, K, 1.0, A, K, W, K,
                      1.0, C, N)
        return
    _addmm_nt(A, W, C, tmp, small)


@njit(cache=True)
def _step_nn(mk, A, W, C, small, pbuf):
    """The backward per-step product C = A @ W (A: (m, GH) deltas, W: W_hh
    (GH, H), C: (m, H)): MKL when mk says so, else _mm."""
    if mk[0] & MK_BWD:
        M, K = A.shape
        N = W.shape[1]
        if mk[0] & MK_PACKED:
            _mkl_compute(mk[3], _NO_TRANS, _PACKED, M, N, K, A, K, pbuf, N,
                         0.0, C, N)
        else:
            _mkl_gemm(mk[1], _NO_TRANS, _NO_TRANS, M, N, K, 1.0, A, K, W, N,
                      0.0, C, N)
        return
    _mm(A, W, C, small)


# ---- one-off products split over the cores ---------------------------------
# BLAS is pinned to one thread while our kernels run (see _blas_one_thread):
# its own worker threads would compete with numba's for the same two cores.
# Products below PAR_MACS multiply-adds are not worth a parallel region.
PAR_MACS = 1 << 20


@njit(cache=True, parallel=True)
def _pmm(A, Bm, C, nc, par):
    """C = A @ Bm (Bm may be a transposed view), rows of A and C split over
    nc cores when the product has at least `par` multiply-adds."""
    M = A.shape[0]
    if nc == 1 or M * A.shape[1] * C.shape[1] < par or M < nc:
        np.dot(A, Bm, C)
        return
    for c in prange(nc):
        r0 = c * M // nc
        r1 = (c + 1) * M // nc
        np.dot(A[r0:r1], Bm, C[r0:r1])


@njit(cache=True, parallel=True)
def _pmm_acc(A, Bm, C, tmp, nc, par):
    """C += A @ Bm, rows split over nc cores (at >= par multiply-adds); tmp:
    scratch of C's size."""
    M, N = C.shape
    t = tmp[:M * N].reshape((M, N))
    if nc == 1 or M * A.shape[1] * N < par or M < nc:
        nc = 1
    for c in prange(nc):
        r0 = c * M // nc
        r1 = (c + 1) * M // nc
        np.dot(A[r0:r1], Bm, t[r0:r1])
        for r in range(r0, r1):
            cr = C[r]
            tr = t[r]
            for j in range(N):
                cr[j] += tr[j]


@njit(cache=True, parallel=True)
def _pmm_tn(A, Bm, C, part, nc, par):
    """C = A.T @ Bm for A: (R, m), Bm: (R, n): the sum over the R rows split
    into nc partial products (part: scratch of (nc-1)*m*n), then added;
    when the product has at least `par` multiply-adds."""
    R, m = A.shape
    n = Bm.shape[1]
    if nc == 1 or R * m * n < par or R < nc:
        np.dot(A.T, Bm, C)
        return
    P = part[:(nc - 1) * m * n].reshape((nc - 1, m, n))
    for c in prange(nc):
        r0 = c * R // nc
        r1 = (c + 1) * R // nc
        if c == 0:
            np.dot(A[r0:r1].T, Bm[r0:r1], C)
        else:
            np.dot(A[r0:r1].T, Bm[r0:r1], P[c - 1])
    for c in range(nc - 1):
        Pc = P[c]
        for i in range(m):
            ci = C[i]
            pi = Pc[i]
            for j in range(n):
                ci[j] += pi[j]


@njit(cache=True)
def _colsum(A, out):
    """out = A.sum(axis=0) (row by row: vectorised over columns)."""
    out[:] = 0
    for r in range(A.shape[0]):
        a = A[r]
        for j in range(out.shape[0]):
            out[j] += a[j]


@njit(cache=True)
def _transpose_into(W, dst):
    """dst[:K*N].reshape(K, N) = W.T for W (N, K); returns the view."""
    N, K = W.shape
    out = dst[:K * N].reshape((K, N))
    for n in range(N):
        for k in range(K):
            out[k, n] = W[n, k]
    return out


@njit(cache=True)
def _project(x, tok, W_ih, b_ih, b_hh, bias, dst, wt, nc, par):
    """dst (T*B, G*H) = x @ W_ih.T + b_ih + b_hh; token ids gather rows of W_ih.T."""
    GH = W_ih.shape[0]
    if tok.shape[0] > 0:
        WT = _transpose_into(W_ih, wt)
        for r in range(tok.shape[0]):
            src = WT[tok[r]]
            d = dst[r]
            for j in range(GH):
                d[j] = src[j]
    else:
        _pmm(x, W_ih.T, dst, nc, par)
    if bias:
        for r in range(dst.shape[0]):
            d = dst[r]
            for j in range(GH):
                d[j] += b_ih[j] + b_hh[j]


# ============================================================================
# one direction of one layer: forward and backward side by side
# ============================================================================
@njit(cache=True)
def _rnn_recur(mode, fast, small, rev, lengths, W_hh, HX, lout, col, co,
               r0, r1, mk, pbuf):
    """Elman RNN recurrence of one direction for batch rows [r0, r1).

    HX: (T+2, B, H) holds the input projection (+ biases) at HX[t+1] on
    entry and the states on exit (h0 already at HX[0] / HX[T+1] for the
    reverse direction); lout: (T, B, D*H) layer output, columns [col, col+H).
    Padding steps keep the state and output zeros. The activation runs once
    per step over the chunk's whole (rows, H) block. mk, pbuf: MKL for the
    per-step product (see _step_nt) and this chunk's packing buffer."""
    T = HX.shape[0] - 2
    H = HX.shape[2]
    n = r1 - r0
    _mkl_pack_w(mk, W_hh, n, True, pbuf)
    tmp = np.empty(n * H, dtype=HX.dtype)
    fscr = np.empty(n * H, dtype=HX.dtype)
    ibuf = np.empty(n * H, dtype=np.int32)
    for s in range(T):
        t = T - 1 - s if rev else s
        tp = t + 2 if rev else t
        C = HX[t + 1, r0:r1]
        _step_nt(mk, HX[tp, r0:r1], W_hh, C, tmp, small, pbuf)
        A = C.reshape(n * H)
        _act_block(fast, mode == 1, A, A, co, fscr, ibuf)
        for b in range(r0, r1):
            row = HX[t + 1, b]
            o = lout[t, b, col:col + H]
            if t < lengths[b]:
                for j in range(H):
                    o[j] = row[j]
            else:
                prev = HX[tp, b]
                for j in range(H):
                    row[j] = prev[j]
                    o[j] = 0


@njit(cache=True)
def _rnn_back_recur(mode, small, rev, lengths, W_hh, HX, dlout, col, dh,
                    DELTA, sclip, use_sclip, flow, r0, r1, mk, pbuf):
    """BPTT of one direction for batch rows [r0, r1). dh (B, H) holds dL/dh_T
    on entry and dL/dh0 on exit; DELTA (T, B, H) receives dL/da_t. dlout:
    (T, B, D*H) gradient of the layer output (columns [col, col+H)); flow
    (T,) accumulates the squared norm of dL/dh_t of valid rows."""
    T = HX.shape[0] - 2
    H = dh.shape[1]
    _mkl_pack_w(mk, W_hh, r1 - r0, False, pbuf)
    nxt = np.empty((r1 - r0, H), dtype=dh.dtype)
    for s in range(T):
        t = s if rev else T - 1 - s
        for b in range(r0, r1):
            dl = DELTA[t, b]
            if t < lengths[b]:
                d = dh[b]
                g = dlout[t, b, col:col + H]
                for j in range(H):
                    d[j] += g[j]
                if use_sclip:
                    for j in range(H):
                        d[j] = min(max(d[j], -sclip), sclip)
                acc = 0.0
                for j in range(H):
                    acc += np.float64(d[j]) * d[j]
                flow[t] += acc
                _dact_mul_row(mode, HX[t + 1, b], d, dl)
            else:
                for j in range(H):
                    dl[j] = 0
        # dh_{t-1} = delta_t @ W_hh for valid rows; padding rows pass through
        _step_nn(mk, DELTA[t, r0:r1], W_hh, nxt, small, pbuf)
        for b in range(r0, r1):
            if t < lengths[b]:
                dh[b] = nxt[b - r0]


@njit(cache=True)
def _lstm_recur(fast, small, rev, lengths, W_hh, GATES, HX, CX, TC, lout,
                col, co, cot, r0, r1, mk, pbuf):
    """LSTM recurrence of one direction for batch rows [r0, r1), gates in
    PyTorch's order (i, f, g, o). GATES: (T, B, 4H) holds the input
    projection (+ biases) on entry and the gate activations on exit; HX/CX:
    (T+2, B, H) the states (h0, c0 already in place), TC: (T, B, H) tanh(c_t).
    Activations run once per step over whole blocks (co: gate coefficients,
    cot: tanh)."""
    T = HX.shape[0] - 2
    H = HX.shape[2]
    n = r1 - r0
    _mkl_pack_w(mk, W_hh, n, True, pbuf)
    tmp = np.empty(n * 4 * H, dtype=HX.dtype)
    fscr = np.empty(n * 4 * H, dtype=HX.dtype)
    ibuf = np.empty(n * 4 * H, dtype=np.int32)
    for s in range(T):
        t = T - 1 - s if rev else s
        tp = t + 2 if rev else t
        Gt = GATES[t, r0:r1]
        _step_nt(mk, HX[tp, r0:r1], W_hh, Gt, tmp, small, pbuf)
        A = Gt.reshape(n * 4 * H)
        _act_block(fast, False, A, A, co, fscr, ibuf)
        for b in range(r0, r1):
            a = GATES[t, b]
            ig = a[0:H]
            fg = a[H:2 * H]
            gg = a[2 * H:3 * H]
            cp = CX[tp, b]
            c = CX[t + 1, b]
            for j in range(H):
                c[j] = fg[j] * cp[j] + ig[j] * gg[j]
        _act_block(fast, False, CX[t + 1, r0:r1].reshape(n * H),
                   TC[t, r0:r1].reshape(n * H), cot, fscr, ibuf)
        for b in range(r0, r1):
            h = HX[t + 1, b]
            o_ = lout[t, b, col:col + H]
            if t < lengths[b]:
                og = GATES[t, b, 3 * H:4 * H]
                tc = TC[t, b]
                for j in range(H):
                    h[j] = og[j] * tc[j]
                    o_[j] = h[j]
            else:
                hp = HX[tp, b]
                cp = CX[tp, b]
                c = CX[t + 1, b]
                for j in range(H):
                    h[j] = hp[j]
                    c[j] = cp[j]
                    o_[j] = 0


@njit(cache=True)
def _lstm_back_recur(small, rev, lengths, W_hh, GATES, CX, TC, dlout, col,
                     dh, dc, DELTA, sclip, use_sclip, flow, r0, r1, mk, pbuf,
                     dcs):
    """BPTT of one LSTM direction for batch rows [r0, r1). dh, dc (B, H) hold
    dL/dh_T, dL/dc_T on entry and dL/dh0, dL/dc0 on exit; DELTA (T, B, 4H)
    receives dL/d(gate pre-activations). Only dh is state-clipped, never dc.
    dcs (T, B, D*H), or empty: dL/dc_t from outside (return_cell_states)."""
    T = CX.shape[0] - 2
    H = dh.shape[1]
    _mkl_pack_w(mk, W_hh, r1 - r0, False, pbuf)
    nxt = np.empty((r1 - r0, H), dtype=dh.dtype)
    for s in range(T):
        t = s if rev else T - 1 - s
        tp = t + 2 if rev else t
        for b in range(r0, r1):
            dl = DELTA[t, b]
            if t < lengths[b]:
                d = dh[b]
                g = dlout[t, b, col:col + H]
                for j in range(H):
                    d[j] += g[j]
                if use_sclip:
                    for j in range(H):
                        d[j] = min(max(d[j], -sclip), sclip)
                acc = 0.0
                for j in range(H):
                    acc += np.float64(d[j]) * d[j]
                flow[t] += acc
                a = GATES[t, b]
                ig = a[0:H]
                fg = a[H:2 * H]
                gg = a[2 * H:3 * H]
                og = a[3 * H:4 * H]
                tc = TC[t, b]
                cp = CX[tp, b]
                dcc = dc[b]
                if dcs.shape[0] > 0:
                    gc = dcs[t, b, col:col + H]
                    for j in range(H):
                        dcc[j] += gc[j]
                di = dl[0:H]
                df = dl[H:2 * H]
                dg = dl[2 * H:3 * H]
                do = dl[3 * H:4 * H]
                for j in range(H):
                    dct = dcc[j] + d[j] * og[j] * (1 - tc[j] * tc[j])
                    di[j] = dct * gg[j] * ig[j] * (1 - ig[j])
                    df[j] = dct * cp[j] * fg[j] * (1 - fg[j])
                    dg[j] = dct * ig[j] * (1 - gg[j] * gg[j])
                    do[j] = d[j] * tc[j] * og[j] * (1 - og[j])
                    dcc[j] = dct * fg[j]
            else:
                for j in range(4 * H):
                    dl[j] = 0
        _step_nn(mk, DELTA[t, r0:r1], W_hh, nxt, small, pbuf)
        for b in range(r0, r1):
            if t < lengths[b]:
                dh[b] = nxt[b - r0]


# ---- the recurrences, batch rows split into chunks run on separate cores ---
# Batch rows are independent in the recurrence, so each core runs the whole
# time loop for its rows: no synchronisation per step. Inside a chunk the
# per-step product uses the register-blocked loops (no BLAS threads compete).
@njit(cache=True, parallel=True)
def _forward_chunks(lstm, mode, fast, small, nc, rev, lengths, W_hh, GATES,
                    HX, CX, TC, lout, col, co, cot, mk, pack):
    B = HX.shape[1]
    for c in prange(nc):
        r0 = c * B // nc
        r1 = (c + 1) * B // nc
        pbuf = _pack_slot(pack, mk, c)
        prev = _mkl_enter(mk)
        if lstm:
            _lstm_recur(fast, small, rev, lengths, W_hh, GATES, HX, CX, TC,
                        lout, col, co, cot, r0, r1, mk, pbuf)
        else:
            _rnn_recur(mode, fast, small, rev, lengths, W_hh, HX, lout, col,
                       co, r0, r1, mk, pbuf)
        _mkl_exit(mk, prev)


@njit(cache=True, parallel=True)
def _backward_chunks(lstm, mode, small, nc, rev, lengths, W_hh, GATES, HX, CX,
                     TC, dlout, col, dh, dc, DELTA, sclip, use_sclip, flowc,
                     mk, pack, dcs):
    B = HX.shape[1]
    for c in prange(nc):
        r0 = c * B // nc
        r1 = (c + 1) * B // nc
        pbuf = _pack_slot(pack, mk, c)
        prev = _mkl_enter(mk)
        if lstm:
            _lstm_back_recur(small, rev, lengths, W_hh, GATES, CX, TC, dlout,
                             col, dh, dc, DELTA, sclip, use_sclip, flowc[c],
                             r0, r1, mk, pbuf, dcs)
        else:
            _rnn_back_recur(mode, small, rev, lengths, W_hh, HX, dlout, col, dh,
                            DELTA, sclip, use_sclip, flowc[c], r0, r1, mk,
                            pbuf)
        _mkl_exit(mk, prev)


@njit(cache=True)
def _dir_param_grads(x, tok, rev, HX, DELTA, gW_ih, gW_hh, gb_ih, gb_hh,
                     bias, dwt, part, nc, par):
    """dW_ih, dW_hh as one product each over all stored deltas (split over
    the cores as partial sums); db by column sums."""
    T = HX.shape[0] - 2
    B, H = HX.shape[1], HX.shape[2]
    GH = DELTA.shape[2]
    Dl = DELTA.reshape((T * B, GH))
    hprev = HX[2:T + 2] if rev else HX[0:T]
    _pmm_tn(Dl, hprev.reshape((T * B, H)), gW_hh, part, nc, par)
    if tok.shape[0] > 0:
        I = gW_ih.shape[1]
        dw = dwt[:I * GH].reshape((I, GH))
        dw[:] = 0
        for r in range(T * B):
            row = dw[tok[r]]
            dr = Dl[r]
            for j in range(GH):
                row[j] += dr[j]
        for j in range(GH):
            for i in range(I):
                gW_ih[j, i] = dw[i, j]
    else:
        _pmm_tn(Dl, x, gW_ih, part, nc, par)
    if bias:
        _colsum(Dl, gb_ih)
        gb_hh[:] = gb_ih


# ============================================================================
# the whole core
# ============================================================================
@njit(cache=True)
def _mat(flat, off, m, n):
    return flat[off:off + m * n].reshape((m, n))


@njit(cache=True)
def core_forward_kernel(cfg, flat, x, tok, lengths, state0, ws, state_n):
    """All layers and directions. Layer outputs stay in the workspace (LOUT);
    the top layer's output is returned as a view."""
    T, B, I, H = cfg[C_T], cfg[C_B], cfg[C_I], cfg[C_H]
    L, D, mode = cfg[C_L], cfg[C_D], cfg[C_MODE]
    bias, fast, small = cfg[C_BIAS] != 0, cfg[C_FAST] != 0, cfg[C_SMALL]
    G = 4 if mode == LSTM else 1
    sz = _sections_of(cfg)
    HXall = _section(ws, sz, 0).reshape((L * D, T + 2, B, H))
    nl = L * D if mode == LSTM else 0   # LSTM-only sections are empty otherwise
    CXall = _section(ws, sz, 1).reshape((nl, T + 2, B, H))
    GATESall = _section(ws, sz, 2).reshape((nl, T, B, 4 * H))
    TCall = _section(ws, sz, 3).reshape((nl, T, B, H))
    LOUT = _section(ws, sz, 4).reshape((L, T, B, D * H))
    wt = _section(ws, sz, 11)
    mk = cfg[C_MKL:C_MKL + 6]
    pack = _section(ws, sz, 17)
    co = _act_coefs(mode, B, H, G, flat.dtype)
    cot = _act_coefs(0, B, H, 1, flat.dtype)
    nc = cfg[C_NC]
    ncg = cfg[C_NCG]
    # chunked recurrences: register-blocked loops up to CHUNK_MACS per step,
    # then BLAS (pinned to one thread, so the chunks do not compete)
    small_eff = small if nc == 1 else CHUNK_MACS
    lstm = mode == LSTM
    GH = G * H
    for k in range(L):
        Ik = I if k == 0 else D * H
        if k == 0:
            xin = x
            tk = tok
        else:
            xin = LOUT[k - 1].reshape((T * B, D * H))
            tk = tok[:0]
        for d in range(D):
            kd = k * D + d
            base = C_POFF + 4 * kd
            W_ih = _mat(flat, cfg[base], GH, Ik)
            W_hh = _mat(flat, cfg[base + 1], GH, H)
            if bias:
                b_ih = flat[cfg[base + 2]:cfg[base + 2] + GH]
                b_hh = flat[cfg[base + 3]:cfg[base + 3] + GH]
            else:
                b_ih = flat[:0]
                b_hh = flat[:0]
            HX = HXall[kd]
            # the RNN has no gate/cell buffers: pass HX in their place
            GATES = GATESall[kd] if lstm else HX
            CX = CXall[kd] if lstm else HX
            TC = TCall[kd] if lstm else HX
            P = GATES.reshape((T * B, GH)) if lstm else HX[1:T + 1].reshape((T * B, H))
            # input projection for all T*B rows: one product before the loop
            _project(xin, tk, W_ih, b_ih, b_hh, bias, P, wt, ncg, cfg[C_PAR])
            hpos0 = T + 1 if d == 1 else 0
            HX[hpos0] = state0[0, kd]
            if lstm:
                CX[hpos0] = state0[1, kd]
            _forward_chunks(lstm, mode, fast, small_eff, nc, d == 1, lengths,
                            W_hh, GATES, HX, CX, TC, LOUT[k], d * H, co, cot,
                            mk, pack)
            hpos = 1 if d == 1 else T
            # final state: for the forward direction the state at lengths-1
            # (padding steps carried it to HX[T]); reverse: the state after t=0
            state_n[0, kd] = HX[hpos]
            if mode == LSTM:
                state_n[1, kd] = CXall[kd, hpos]
    return LOUT[L - 1]


@njit(cache=True)
def core_backward_kernel(cfg, flat, x, tok, lengths, ws, dtop, dstate_n,
                         grad, dx, dstate0, flow, sclip, dcs):
    """BPTT through the whole core after core_forward_kernel on the same ws.

    dtop: (T, B, D*H) gradient of the top layer output; dcs: (T, B, D*H)
    dL/dc_t of the top LSTM layer, or empty (0, 0, 0); dx: (T*B, I) receives
    the input gradient (ignored for token ids); flow (T,) receives the squared
    norm of dL/dh_t of the top layer (valid rows, both directions)."""
    T, B, I, H = cfg[C_T], cfg[C_B], cfg[C_I], cfg[C_H]
    L, D, mode = cfg[C_L], cfg[C_D], cfg[C_MODE]
    bias, small = cfg[C_BIAS] != 0, cfg[C_SMALL]
    use_sclip = cfg[C_SCLIP] != 0
    G = 4 if mode == LSTM else 1
    GH = G * H
    has_tok = tok.shape[0] > 0
    sz = _sections_of(cfg)
    HXall = _section(ws, sz, 0).reshape((L * D, T + 2, B, H))
    nl = L * D if mode == LSTM else 0
    CXall = _section(ws, sz, 1).reshape((nl, T + 2, B, H))
    GATESall = _section(ws, sz, 2).reshape((nl, T, B, 4 * H))
    TCall = _section(ws, sz, 3).reshape((nl, T, B, H))
    LOUT = _section(ws, sz, 4).reshape((L, T, B, D * H))
    DELTA = _section(ws, sz, 5).reshape((T, B, GH))
    DA = _section(ws, sz, 6)
    DB = _section(ws, sz, 7)
    TMP = _section(ws, sz, 8)
    DH = _section(ws, sz, 10).reshape((2, B, H))
    dwt = _section(ws, sz, 12)
    PART = _section(ws, sz, 9)
    mk = cfg[C_MKL:C_MKL + 6]
    pack = _section(ws, sz, 17)
    nc = cfg[C_NC]
    ncg = cfg[C_NCG]
    small_eff = small if nc == 1 else CHUNK_MACS
    lstm = mode == LSTM
    flowc = np.zeros((nc, T), dtype=np.float64)
    flow[:] = 0
    dl = dtop
    for k in range(L - 1, -1, -1):
        Ik = I if k == 0 else D * H
        if k == 0:
            xin = x
            tk = tok
            din = dx
        else:
            xin = LOUT[k - 1].reshape((T * B, D * H))
            tk = tok[:0]
            din = (DB if (L - 1 - k) % 2 == 0 else DA)[:T * B * Ik].reshape((T * B, Ik))
        for d in range(D):
            kd = k * D + d
            base = C_POFF + 4 * kd
            W_ih = _mat(flat, cfg[base], GH, Ik)
            W_hh = _mat(flat, cfg[base + 1], GH, H)
            gW_ih = _mat(grad, cfg[base], GH, Ik)
            gW_hh = _mat(grad, cfg[base + 1], GH, H)
            if bias:
                gb_ih = grad[cfg[base + 2]:cfg[base + 2] + GH]
                gb_hh = grad[cfg[base + 3]:cfg[base + 3] + GH]
            else:
                gb_ih = grad[:0]
                gb_hh = grad[:0]
            dh = DH[0]
            dh[:] = dstate_n[0, kd]
            dc = DH[1]
            if lstm:
                dc[:] = dstate_n[1, kd]
            HX = HXall[kd]
            flowc[:] = 0
            _backward_chunks(lstm, mode, small_eff, nc, d == 1, lengths, W_hh,
                             GATESall[kd] if lstm else HX, HX,
                             CXall[kd] if lstm else HX,
                             TCall[kd] if lstm else HX, dl, d * H, dh, dc,
                             DELTA, sclip, use_sclip, flowc, mk, pack,
                             dcs if k == L - 1 else dcs[:0])
            if k == L - 1:
                for c in range(nc):
                    for t in range(T):
                        flow[t] += flowc[c, t]
            if lstm:
                dstate0[1, kd] = dc
            dstate0[0, kd] = dh
            _dir_param_grads(xin, tk, d == 1, HXall[kd], DELTA, gW_ih, gW_hh,
                             gb_ih, gb_hh, bias, dwt, PART, ncg, cfg[C_PAR])
            # gradient of this layer's input (not for token ids, nor when the
            # caller passes an empty dx: training needs no input gradient)
            if not (k == 0 and (has_tok or dx.shape[0] == 0)):
                Dl = DELTA.reshape((T * B, GH))
                if d == 0:
                    _pmm(Dl, W_ih, din, ncg, cfg[C_PAR])
                else:
                    _pmm_acc(Dl, W_ih, din, TMP, ncg, cfg[C_PAR])
        if k > 0:
            dl = din.reshape((T, B, Ik))
    for t in range(T):
        flow[t] = math.sqrt(flow[t])


# ============================================================================
# read-out, loss, clipping, optimizer: the fused training step
# ============================================================================
@njit(cache=True)
def _loss_row(loss_kind, z, yi, yf, inv_b, dz):
    """Loss of one read-out row (float64) and its gradient dz (already / B).
    Cross-entropy: softmax over z, target class yi; mse: mean over O."""
    O = z.shape[0]
    if loss_kind == 0:
        m = np.float64(z[0])
        for o in range(1, O):
            if z[o] > m:
                m = np.float64(z[o])
        s = 0.0
        for o in range(O):
            e = math.exp(np.float64(z[o]) - m)
            dz[o] = e
            s += e
        for o in range(O):
            dz[o] = dz[o] / s * inv_b
        dz[yi] -= inv_b
        return m + math.log(s) - np.float64(z[yi])
    acc = 0.0
    for o in range(O):
        diff = np.float64(z[o]) - np.float64(yf[o])
        acc += diff * diff
        dz[o] = 2 * (z[o] - yf[o]) / O * inv_b
    return acc / O


@njit(cache=True)
def _ce_block_fast(Z, yi, lengths, B, inv_b, dZ, ES, ibuf):
    """Cross-entropy over all read-out rows r = t*B + b at once (float32):
    the exponentials of the whole block in one vectorised pass. Returns the
    summed loss of the valid rows; dZ = (softmax - onehot) / B, 0 at padding."""
    R, O = Z.shape
    E = ES[:R * O]
    mrow = np.empty(R, dtype=np.float64)
    for r in range(R):
        z = Z[r]
        m = z[0]
        for o in range(1, O):
            if z[o] > m:
                m = z[o]
        mrow[r] = m
        for o in range(O):
            u = z[o] - m
            E[r * O + o] = np.float32(-87.0) if u < -87 else u
    dflat = dZ.reshape(R * O)
    _expm1_f32_row(E, dflat, ibuf)
    loss = 0.0
    for r in range(R):
        d = dZ[r]
        if r // B < lengths[r % B]:
            acc = 0.0
            for o in range(O):
                d[o] += 1
                acc += d[o]
            y = yi[min(r, yi.shape[0] - 1)]
            loss += mrow[r] + math.log(acc) - np.float64(Z[r, y])
            sc = inv_b / acc
            for o in range(O):
                d[o] = d[o] * sc
            d[y] -= inv_b
        else:
            for o in range(O):
                d[o] = 0
    return loss


@njit(cache=True)
def readout_forward_kernel(cfg, flat, lengths, top, ws):
    """Linear read-out of the top layer output into the workspace section Z:
    (T*B, O) for readout 'all' (zero at padding steps) or (B, O) for 'last'
    (then HLAST holds each sequence's last valid output). Returns Z's view."""
    T, B, H, D, O = cfg[C_T], cfg[C_B], cfg[C_H], cfg[C_D], cfg[C_O]
    DH = D * H
    sz = _sections_of(cfg)
    W = _mat(flat, cfg[C_WOUT], O, DH)
    bout = flat[cfg[C_BOUT]:cfg[C_BOUT] + O]
    if cfg[C_READOUT] == 1:
        hl = _section(ws, sz, 15).reshape((B, DH))
        z = _section(ws, sz, 13)[:B * O].reshape((B, O))
        for b in range(B):
            hl[b] = top[lengths[b] - 1, b]
        np.dot(hl, W.T, z)
        for b in range(B):
            for o in range(O):
                z[b, o] += bout[o]
        return z
    z = _section(ws, sz, 13).reshape((T * B, O))
    _pmm(top.reshape((T * B, DH)), W.T, z, cfg[C_NCG], cfg[C_PAR])
    for t in range(T):
        for b in range(B):
            r = z[t * B + b]
            if t < lengths[b]:
                for o in range(O):
                    r[o] += bout[o]
            else:
                for o in range(O):
                    r[o] = 0
    return z


@njit(cache=True)
def _sections_of(cfg):
    mode = cfg[C_MODE]
    G = 4 if mode == LSTM else 1
    return _sections(cfg[C_T], cfg[C_B], cfg[C_I], cfg[C_H], cfg[C_L],
                     cfg[C_D], G, cfg[C_O], 1 if mode == LSTM else 0,
                     cfg[C_TOK], cfg[C_NCG], cfg[C_NC] * cfg[C_MKL_PACKN])


@njit(cache=True)
def loss_backward_kernel(cfg, flat, lengths, top, ws, yi, yf, grad, dtop):
    """Loss (sum over steps, mean over batch) of the read-out that
    readout_forward_kernel left in ws; fills dtop (T, B, D*H) and the
    read-out gradients. yi: class ids, one per read-out row (length 1 dummy
    for mse); yf: (rows, O) targets (a (1, O) dummy for cross-entropy)."""
    T, B, H, D, O = cfg[C_T], cfg[C_B], cfg[C_H], cfg[C_D], cfg[C_O]
    DH = D * H
    sz = _sections_of(cfg)
    W = _mat(flat, cfg[C_WOUT], O, DH)
    gW = _mat(grad, cfg[C_WOUT], O, DH)
    gb = grad[cfg[C_BOUT]:cfg[C_BOUT] + O]
    inv_b = 1.0 / B
    ni, nf = yi.shape[0] - 1, yf.shape[0] - 1
    loss = 0.0
    if cfg[C_READOUT] == 1:
        z = _section(ws, sz, 13)[:B * O].reshape((B, O))
        dz = _section(ws, sz, 14)[:B * O].reshape((B, O))
        hl = _section(ws, sz, 15).reshape((B, DH))
        for b in range(B):
            loss += _loss_row(cfg[C_LOSS], z[b], yi[min(b, ni)],
                              yf[min(b, nf)], inv_b, dz[b])
        np.dot(dz.T, hl, gW)
        dh = _section(ws, sz, 8)[:B * DH].reshape((B, DH))
        np.dot(dz, W, dh)
        dtop[:] = 0
        for b in range(B):
            dtop[lengths[b] - 1, b] = dh[b]
    else:
        z = _section(ws, sz, 13).reshape((T * B, O))
        dz = _section(ws, sz, 14).reshape((T * B, O))
        if cfg[C_FAST] != 0 and cfg[C_LOSS] == 0:
            # float32 cross-entropy: vectorised exponentials over the block;
            # the second half of section ZS holds their int32 exponent bits
            ZS = _section(ws, sz, 16)
            n = T * B * O
            loss = _ce_block_fast(z, yi, lengths, B, inv_b, dz, ZS[:n],
                                  ZS[n:].view(np.int32))
        else:
            for t in range(T):
                for b in range(B):
                    r = t * B + b
                    if t < lengths[b]:
                        loss += _loss_row(cfg[C_LOSS], z[r], yi[min(r, ni)],
                                          yf[min(r, nf)], inv_b, dz[r])
                    else:
                        dz[r] = 0
        _pmm_tn(dz, top.reshape((T * B, DH)), gW, _section(ws, sz, 9),
                cfg[C_NCG], cfg[C_PAR])
        _pmm(dz, W, dtop.reshape((T * B, DH)), cfg[C_NCG], cfg[C_PAR])
    gb[:] = 0
    for r in range(dz.shape[0]):
        for o in range(O):
            gb[o] += dz[r, o]
    return loss * inv_b


@njit(cache=True)
def clip_update_kernel(cfg, fcfg, flat, grad, opt_state, res):
    """Global norm, finiteness guard, clipping and the optimizer update, each
    one loop over the flat arrays. res[R_LOSS] must hold the loss already."""
    P = flat.shape[0]
    acc = 0.0
    for j in range(P):
        acc += np.float64(grad[j]) * grad[j]
    gnorm = math.sqrt(acc)
    res[R_GNORM] = gnorm
    res[R_CLIPPED] = 0
    if not (math.isfinite(res[R_LOSS]) and math.isfinite(gnorm)):
        res[R_SKIPPED] = 1
        return
    res[R_SKIPPED] = 0
    limit = fcfg[F_LIMIT]
    if cfg[C_CLIP] == 1 and gnorm > limit:
        scale = grad.dtype.type(limit / gnorm)
        for j in range(P):
            grad[j] *= scale
        res[R_CLIPPED] = 1
    elif cfg[C_CLIP] == 2:
        lim = grad.dtype.type(limit)
        n = 0
        for j in range(P):
            g = grad[j]
            if g > lim:
                grad[j] = lim
                n += 1
            elif g < -lim:
                grad[j] = -lim
                n += 1
        res[R_CLIPPED] = 1 if n > 0 else 0
    lr = fcfg[F_LR]
    m = opt_state[0]
    v = opt_state[1]
    opt = cfg[C_OPT]
    if opt == 0:
        mu = fcfg[F_MOM]
        if mu != 0:
            for j in range(P):
                m[j] = mu * m[j] + grad[j]
                flat[j] -= lr * m[j]
        else:
            for j in range(P):
                flat[j] -= lr * grad[j]
    elif opt == 1:
        b1, b2, eps = fcfg[F_B1], fcfg[F_B2], fcfg[F_EPS]
        step = cfg[C_STEP]
        bc1 = 1 - b1 ** step
        bc2s = math.sqrt(1 - b2 ** step)
        step_size = lr / bc1
        for j in range(P):
            g = grad[j]
            m[j] = b1 * m[j] + (1 - b1) * g
            v[j] = b2 * v[j] + (1 - b2) * g * g
            flat[j] -= step_size * m[j] / (math.sqrt(v[j]) / bc2s + eps)
    else:
        eps = fcfg[F_EPS]
        for j in range(P):
            g = grad[j]
            m[j] = m[j] + g * g
            flat[j] -= lr * g / (math.sqrt(m[j]) + eps)


@njit(cache=True)
def train_step_kernel(cfg, fcfg, flat, grad, opt_state, batch, ws, state_n,
                      res):
    """One fused training step: forward over time, loss, BPTT, clipping and
    the optimizer update. batch = (x, tok, lengths, state0, yi, yf).
    res receives loss, grad norm (before clipping), clipped, skipped."""
    x, tok, lengths, state0, yi, yf = batch
    T, B = cfg[C_T], cfg[C_B]
    top = core_forward_kernel(cfg, flat, x, tok, lengths, state0, ws, state_n)
    readout_forward_kernel(cfg, flat, lengths, top, ws)
    sz = _sections_of(cfg)
    DH = cfg[C_D] * cfg[C_H]
    dtop = _section(ws, sz, 6)[:T * B * DH].reshape((T, B, DH))
    res[R_LOSS] = loss_backward_kernel(cfg, flat, lengths, top, ws, yi, yf,
                                       grad, dtop)
    dstate = np.zeros_like(state_n)
    flow = np.empty(T, dtype=np.float64)
    dx = x[:0]  # input gradient is not needed for training
    core_backward_kernel(cfg, flat, x, tok, lengths, ws, dtop, dstate, grad,
                         dx, dstate, flow, fcfg[F_SCLIP], dtop[:0])
    clip_update_kernel(cfg, fcfg, flat, grad, opt_state, res)


@njit(cache=True)
def flow_kernel(cfg, flat, grad, batch, ws, state_n, flow):
    """Forward, loss and BPTT; flow (T,) receives the norm of dL/dh_t of the
    top layer per step."""
    x, tok, lengths, state0, yi, yf = batch
    T, B = cfg[C_T], cfg[C_B]
    top = core_forward_kernel(cfg, flat, x, tok, lengths, state0, ws, state_n)
    readout_forward_kernel(cfg, flat, lengths, top, ws)
    sz = _sections_of(cfg)
    DH = cfg[C_D] * cfg[C_H]
    dtop = _section(ws, sz, 6)[:T * B * DH].reshape((T, B, DH))
    loss = loss_backward_kernel(cfg, flat, lengths, top, ws, yi, yf, grad,
                                dtop)
    dstate = np.zeros_like(state_n)
    core_backward_kernel(cfg, flat, x, tok, lengths, ws, dtop, dstate, grad,
                         x[:0], dstate, flow, 0.0, dtop[:0])
    return loss


# ============================================================================
# Python entry points (the same functions as backends/reference.py)
# ============================================================================
_OPTS = {"sgd": 0, "adam": 1, "adagrad": 2}
_CLIPS = {None: 0, "norm": 1, "value": 2}
_MODES = {"tanh": 0, "relu": 1, "sigmoid": 2, "lstm": 3}


class _BlasThreads:
    """Pins the BLAS that numba's np.dot calls (scipy's OpenBLAS) to one
    thread for the duration of a kernel call, then restores the caller's
    setting. If that library cannot be found, can_pin is False and the
    kernels do not split work over cores themselves."""

    def __init__(self):
        self.can_pin = False
        self._get = self._set = None
        try:
            import ctypes
            import glob
            import os

            import scipy
            libdir = os.path.join(os.path.dirname(os.path.dirname(scipy.__file__)),
                                  "scipy.libs")
            for path in sorted(glob.glob(os.path.join(libdir, "libscipy_openblas*.so*"))):
                if "64_" in os.path.basename(path):
                    continue          # numpy's ILP64 build is not the one numba calls
                lib = ctypes.CDLL(path)
                self._get = lib.scipy_openblas_get_num_threads
                self._set = lib.scipy_openblas_set_num_threads
                self._get.restype = ctypes.c_int
                self._set.argtypes = [ctypes.c_int]
                self.can_pin = True
                break
        except Exception:
            self.can_pin = False

    def __call__(self, pin):
        """Context manager: pin to one thread if `pin`, else change nothing."""
        self._pin = pin and self.can_pin
        return self

    def __enter__(self):
        if self._pin:
            self._saved = self._get()
            if self._saved != 1:
                self._set(1)
        return self

    def __exit__(self, *exc):
        if self._pin and self._saved != 1:
            self._set(self._saved)
        return False


_BLAS = _BlasThreads()


class _Ctx:
    """Per-caller state kept between calls: the workspace and the cfg array
    for the last shape, so a steady training loop allocates nothing."""
    __slots__ = ("key", "cfg", "ws", "grad", "state_n", "res", "fcfg", "pin")

    def __init__(self):
        self.key = None


def _ctx(ctx):
    return ctx_state(ctx, "numba", _Ctx)


def _mkl_config(cfg, spec, dtype, B, nc):
    """Fill cfg's MKL slots for this shape; returns the elements of one
    chunk's packing slot (0: no packing)."""
    cfg[C_MKL:C_MKL + 6] = 0
    if _GEMM != "mkl" or nc < 2:
        return 0
    flags = mkl_paths(B // nc, spec.H,     # the smallest chunk
                      4 if spec.mode == "lstm" else 1)
    if flags & (MK_FWD | MK_BWD) == 0:
        return 0
    t = np.dtype(dtype).char
    cfg[C_MKL] = flags
    cfg[C_MKL_GEMM] = _MKL.gemm[t]
    cfg[C_MKL_PACK] = _MKL.pack[t]
    cfg[C_MKL_COMP] = _MKL.compute[t]
    cfg[C_MKL_LOCAL] = _MKL.set_threads_local
    if not flags & MK_PACKED:
        return 0
    H, GH = spec.H, (4 if spec.mode == "lstm" else 1) * spec.H
    m = -(-B // nc)                        # the largest chunk
    nbytes = max(_MKL.pack_size(t, _B_MATRIX, m, GH, H),     # W_hh.T, forward
                 _MKL.pack_size(t, _B_MATRIX, m, H, GH))     # W_hh, backward
    isz = np.dtype(dtype).itemsize
    packn = -(-nbytes // isz) + 64 // isz  # + room to align the slot
    cfg[C_MKL_PACKN] = packn
    return packn


def _prepare(c, spec, flat, T, B, tok):
    if _MKL_REQUIRED and _MKL is None:
        raise RuntimeError("FASTRNN_MKL=1 asks for MKL in the numba backend, "
                           f"but it is not usable: {_MKL_WHY}")
    if _MKL_ENV_BAD:
        raise ValueError("FASTRNN_MKL: expected 0, 1 or auto (unset), got "
                         f"{os.environ.get('FASTRNN_MKL')!r}")
    key = (spec, T, B, tok, flat.dtype, numba.get_num_threads(), PAR_MACS,
           _GEMM, MKL_PACKED, MKL_FORCE, WS_ALIGN)
    if c.key == key:
        return
    from .._spec import out_offsets, param_offsets
    poff = param_offsets(spec)
    cfg = np.zeros(C_POFF + poff.size, dtype=np.int64)
    cfg[C_T], cfg[C_B], cfg[C_I], cfg[C_H] = T, B, spec.I, spec.H
    cfg[C_L], cfg[C_D], cfg[C_MODE] = spec.L, spec.D, _MODES[spec.mode]
    cfg[C_BIAS], cfg[C_TOK], cfg[C_O] = int(spec.bias), int(tok), spec.O
    cfg[C_READOUT] = 1 if spec.readout == "last" else 0
    cfg[C_LOSS] = 1 if spec.loss == "mse" else 0
    cfg[C_FAST] = int(flat.dtype == np.float32)
    cfg[C_SMALL] = SMALL_MACS
    # Work split over the cores: batch rows for the recurrences (rows are
    # independent), rows or partial sums for the one-off products. Only when
    # BLAS can be pinned to one thread during our calls; otherwise BLAS keeps
    # its own threads and the kernels run on one core (no oversubscription).
    # At B = 1 there is nothing to split in the recurrence: the per-step
    # product is then best left to BLAS with its own threads.
    # Caps keep the chunks' row blocks and the partial-sum scratch (PART,
    # (ncg-1) copies of a weight gradient) reasonable on many-core machines.
    ncg = min(numba.get_num_threads(), MAX_SPLIT) if (_BLAS.can_pin and B >= 2) else 1
    cfg[C_NCG] = ncg
    cfg[C_NC] = max(1, min(ncg, B))
    c.pin = ncg > 1
    cfg[C_PAR] = PAR_MACS
    cfg[C_WOUT], cfg[C_BOUT] = out_offsets(spec)
    cfg[C_POFF:] = poff.ravel()
    packn = _mkl_config(cfg, spec, flat.dtype, B, cfg[C_NC])
    G = 4 if spec.mode == "lstm" else 1
    n = workspace_size(T, B, spec.I, spec.H, spec.L, spec.D, G, spec.O,
                       int(spec.mode == "lstm"), int(tok), ncg,
                       cfg[C_NC] * packn)
    c.cfg = cfg
    c.ws = _aligned_zeros(n, flat.dtype, WS_ALIGN)
    c.grad = np.zeros_like(flat)
    c.state_n = np.zeros((2 if spec.mode == "lstm" else 1, spec.L * spec.D,
                          B, spec.H), dtype=flat.dtype)
    c.res = np.zeros(4, dtype=np.float64)
    c.fcfg = np.zeros(8, dtype=np.float64)
    c.key = key


def _split_x(x, dtype):
    """(T, B, I) float -> ((T*B, I), empty ids); (T, B) ids -> (empty, ids)."""
    T, B = x.shape[0], x.shape[1]
    if x.dtype.kind in "iu":
        return np.empty((0, 1), dtype=dtype), np.ascontiguousarray(x, dtype=np.int64).reshape(T * B), True
    return np.ascontiguousarray(x, dtype=dtype).reshape(T * B, x.shape[2]), np.empty(0, np.int64), False


def _targets(spec, y, dtype):
    if spec.loss == "cross_entropy":
        return (np.ascontiguousarray(y, dtype=np.int64).reshape(-1),
                np.zeros((1, max(spec.O, 1)), dtype=dtype))
    return (np.zeros(1, dtype=np.int64),
            np.ascontiguousarray(y, dtype=dtype).reshape(-1, spec.O))


def _begin(spec, flat, x, lengths, ctx):
    """What every entry point starts with: the caller's kept state prepared
    for this shape, x split into float rows / token ids, lengths as int64,
    and a fresh final-state array."""
    c = _ctx(ctx)
    T, B = x.shape[0], x.shape[1]
    x2, tok, is_tok = _split_x(x, flat.dtype)
    _prepare(c, spec, flat, T, B, is_tok)
    lengths = np.ascontiguousarray(lengths, dtype=np.int64)
    return c, T, B, x2, tok, lengths, np.empty_like(c.state_n)


def core_forward(spec, flat, x, lengths, state0, ctx=None):
    c, T, B, x2, tok, lengths, state_n = _begin(spec, flat, x, lengths, ctx)
    with _BLAS(c.pin):
        top = core_forward_kernel(c.cfg, flat, x2, tok, lengths, state0, c.ws,
                                  state_n)
    return top.copy(), state_n, (c, x2, tok, lengths, T, B, state_n.shape)


def core_backward(spec, flat, cache, dout, dstate_n, state_clip=None,
                  ctx=None, dcs=None):
    c, x2, tok, lengths, T, B, sshape = cache
    cfg = c.cfg.copy()
    cfg[C_SCLIP] = int(state_clip is not None)
    grad = np.zeros_like(flat)
    dx = np.empty((T * B, spec.I) if tok.shape[0] == 0 else (0, 1), dtype=flat.dtype)
    dstate0 = np.zeros(sshape, dtype=flat.dtype)
    flow = np.empty(T, dtype=np.float64)
    dout = np.ascontiguousarray(dout, dtype=flat.dtype)
    dstate_n = np.ascontiguousarray(dstate_n, dtype=flat.dtype)
    dcs = (dout[:0] if dcs is None or spec.mode != "lstm"
           else np.ascontiguousarray(dcs, dtype=flat.dtype))
    with _BLAS(c.pin):
        core_backward_kernel(cfg, flat, x2, tok, lengths, c.ws, dout, dstate_n,
                             grad, dx, dstate0, flow,
                             0.0 if state_clip is None else float(state_clip),
                             dcs)
    dx = None if tok.shape[0] else dx.reshape(T, B, spec.I)
    return dx, dstate0, grad, flow


def model_forward(spec, flat, x, lengths, state0, ctx=None):
    c, T, B, x2, tok, lengths, state_n = _begin(spec, flat, x, lengths, ctx)
    with _BLAS(c.pin):
        top = core_forward_kernel(c.cfg, flat, x2, tok, lengths, state0, c.ws,
                                  state_n)
        z = readout_forward_kernel(c.cfg, flat, lengths, top, c.ws).copy()
    if spec.readout == "last":
        return z, state_n
    return z.reshape(T, B, spec.O), state_n


def train_step(spec, flat, opt_state, step, x, lengths, state0, y, *, opt,
               hyper, clip, limit, state_clip, ctx=None):
    c, T, B, x2, tok, lengths, state_n = _begin(spec, flat, x, lengths, ctx)
    cfg, f = c.cfg, c.fcfg
    _set_update(cfg, f, step, opt, hyper, clip, limit, state_clip)
    yi, yf = _targets(spec, y, flat.dtype)
    with _BLAS(c.pin):
        train_step_kernel(cfg, f, flat, c.grad, opt_state,
                          (x2, tok, lengths, state0, yi, yf), c.ws, state_n, c.res)
    r = c.res
    return dict(loss=float(r[R_LOSS]), grad_norm=float(r[R_GNORM]),
                clipped=bool(r[R_CLIPPED]), skipped=bool(r[R_SKIPPED]),
                state_n=state_n, grad=c.grad)


def gradient_flow(spec, flat, x, lengths, state0, y, ctx=None):
    c, T, B, x2, tok, lengths, state_n = _begin(spec, flat, x, lengths, ctx)
    yi, yf = _targets(spec, y, flat.dtype)
    flow = np.empty(T, dtype=np.float64)
    cfg = c.cfg.copy()
    cfg[C_SCLIP] = 0
    with _BLAS(c.pin):
        flow_kernel(cfg, flat, c.grad, (x2, tok, lengths, state0, yi, yf), c.ws,
                    state_n, flow)
    return flow


# ----------------------------------------------------------------------------
# train_step in two halves, for data-parallel training (fastrnn/_dist.py):
# train_grad -> (sum the gradients of all ranks) -> apply_update
# ----------------------------------------------------------------------------
def _set_update(cfg, f, step, opt, hyper, clip, limit, state_clip):
    """The optimizer, clipping and step slots of cfg and fcfg."""
    cfg[C_OPT] = _OPTS[opt]
    cfg[C_CLIP] = _CLIPS[clip]
    cfg[C_SCLIP] = int(state_clip is not None)
    cfg[C_STEP] = step
    f[F_LR] = hyper["lr"]
    f[F_MOM] = hyper.get("momentum", 0.0)
    f[F_B1] = hyper.get("beta1", 0.0)
    f[F_B2] = hyper.get("beta2", 0.0)
    f[F_EPS] = hyper.get("eps", 0.0)
    f[F_LIMIT] = 0.0 if limit is None else limit
    f[F_SCLIP] = 0.0 if state_clip is None else state_clip


@njit(cache=True)
def grad_kernel(cfg, fcfg, flat, grad, batch, ws, state_n):
    """train_step_kernel up to the gradient: forward over time, loss and
    BPTT into grad; returns the loss. batch = (x, tok, lengths, state0, yi,
    yf)."""
    x, tok, lengths, state0, yi, yf = batch
    T, B = cfg[C_T], cfg[C_B]
    top = core_forward_kernel(cfg, flat, x, tok, lengths, state0, ws, state_n)
    readout_forward_kernel(cfg, flat, lengths, top, ws)
    sz = _sections_of(cfg)
    DH = cfg[C_D] * cfg[C_H]
    dtop = _section(ws, sz, 6)[:T * B * DH].reshape((T, B, DH))
    loss = loss_backward_kernel(cfg, flat, lengths, top, ws, yi, yf, grad,
                                dtop)
    dstate = np.zeros_like(state_n)
    core_backward_kernel(cfg, flat, x, tok, lengths, ws, dtop, dstate, grad,
                         x[:0], dstate, np.empty(T, dtype=np.float64),
                         fcfg[F_SCLIP], dtop[:0])
    return loss


def train_grad(spec, flat, x, lengths, state0, y, *, state_clip, ctx=None):
    c, T, B, x2, tok, lengths, state_n = _begin(spec, flat, x, lengths, ctx)
    cfg, f = c.cfg, c.fcfg
    cfg[C_SCLIP] = int(state_clip is not None)
    f[F_SCLIP] = 0.0 if state_clip is None else state_clip
    yi, yf = _targets(spec, y, flat.dtype)
    with _BLAS(c.pin):
        loss = grad_kernel(cfg, f, flat, c.grad,
                           (x2, tok, lengths, state0, yi, yf), c.ws, state_n)
    return dict(loss=float(loss), grad=c.grad, state_n=state_n)


class _Update:
    """apply_update's cfg, fcfg and result slots, kept per caller."""
    __slots__ = ("cfg", "fcfg", "res")

    def __init__(self):
        self.cfg = np.zeros(C_POFF, dtype=np.int64)
        self.fcfg = np.zeros(8, dtype=np.float64)
        self.res = np.zeros(4, dtype=np.float64)


def apply_update(spec, flat, opt_state, step, grad, loss, *, opt, hyper, clip,
                 limit, ctx=None):
    u = ctx_state(ctx, "numba_update", _Update)
    _set_update(u.cfg, u.fcfg, step, opt, hyper, clip, limit, None)
    u.res[R_LOSS] = loss
    clip_update_kernel(u.cfg, u.fcfg, flat, grad, opt_state, u.res)
    r = u.res
    return dict(grad_norm=float(r[R_GNORM]), clipped=bool(r[R_CLIPPED]),
                skipped=bool(r[R_SKIPPED]), grad=grad)


def top_cells(spec, cache):
    """The top layer's cell states c_t of the LSTM forward that made `cache`:
    (T, B, D*H) laid out like `out`, zero at padding steps."""
    c, _, _, lengths, T, B, _ = cache
    L, D, H = spec.L, spec.D, spec.H
    CX = _section(c.ws, _sections_of(c.cfg), 1).reshape((L * D, T + 2, B, H))
    cs = np.empty((T, B, D * H), dtype=c.ws.dtype)
    for d in range(D):
        cs[:, :, d * H:(d + 1) * H] = CX[(L - 1) * D + d, 1:T + 1]
    cs[np.arange(T)[:, None] >= lengths[None, :]] = 0
    return cs
