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
- Two cores (or more): batch rows are independent in the recurrence, so
  they are split into chunks (``_forward_chunks``/``_backward_chunks``,
  prange) that each run the whole time loop on one core with no per-step
  synchronisation. The chunks are a fixed partition of the batch
  (``chunk_rows``: it depends on B only), so results are bitwise the same
  for any thread count. The one-off products (projection, weight and input
  gradients, read-out) split the rows of their result over the cores
  (``_pgemm``, ``_pgemm_nt``, ``_wgrad_nt``), which gives the same bits for
  any split.
- No external BLAS: every product is fastrnn's own loops (``_addmm_nt``: dot
  products, 4 rows of A by 2 rows of W in registers; ``_gemm_nn``/
  ``_gemm_tn``: axpy form for short sums) or MKL at one thread set
  thread-locally. SciPy's OpenBLAS, which numba's np.dot calls, keeps its
  thread count in process-wide state (pinning it per call was not
  thread-safe) and its results change with that count; it is never called,
  and the user's OPENBLAS_NUM_THREADS changes nothing here.
- A measured plan per machine (``choose``, backends/_plan.py) picks, per
  shape class, MKL or the loops for the per-step products and all of
  numba's threads or one (numba.set_num_threads is per calling thread),
  and for the LSTM the fused forward or not; FASTRNN_PLAN=off keeps the
  loops and the unfused recurrence on all threads.
- Fused LSTM forward (MK_FUSED, ``_lstm_recur_tiled``): per tile of
  LSTM_TILE hidden units, the 4 gate blocks of the per-step product, their
  activations and the cell/h update while the tile is in L1 (W_hh's rows
  regrouped per tile once per call, ``_tile_order``). Measured on an AMD
  EPYC (Zen 5, AVX-512; the products compile to zmm FMAs; benchmarks/
  lstm_fused.py) the whole training step is 0.84-0.97x the unfused one in
  float32 and 0.87-0.99x in float64: with a 1 MB L2 the unfused passes are
  cheap, and the tile's gather/scatter of the gate rows costs what the L1
  residency saves (a variant without the copies, products and activations
  in place on GATES per gate block, measured 0.76-0.93x: 4 products of
  LSTM_TILE columns and 5 activation calls per row and tile). So the plan
  keeps it as a candidate for machines where it pays; it is not the default.
- Register-tiled products (MK_TILE, ``_gemm_packed``): a GEMM_MR x
  GEMM_NR block of C (4 x 32 on AVX-512, 4 x 16 on AVX2) held in
  registers while k runs, one broadcast of A and the packed panel row of W
  per k (zmm FMAs with embedded broadcasts on the AMD EPYC); W_hh packed
  once per recurrence for all chunks (``_pack_shared``), the wide weight
  gradients on the same kernel (``_wgrad_tiled``). Each element is its
  k-ordered FMA chain, so the bits do not depend on the thread count.
  Measured there (benchmarks/tiled_products.py, float32, 2 threads, on a
  shared machine; results/tiled_products.txt): the per-step products
  1.2-2.4x the 4x2 loops at B >= 16 (one backward point 0.99x), 0.6-1.3x
  at B = 1 (one row: 3 of the 4 rows of the block are wasted); whole
  training steps mostly 1.0-1.2x at B >= 16 (1.51x RNN and 1.21x LSTM at
  B=64, H=512, T=100; one LSTM point 0.79x in one run, 0.97-1.05x in two
  others), 0.89-0.99x at B = 1. So the plan chooses it per shape;
  FASTRNN_PLAN=off keeps the loops.
- Optional Intel MKL (the `mkl` extra, backends/_mkl.py; FASTRNN_MKL=0
  turns it off, =1 requires it): the per-step products call cblas_?gemm (or
  the packed API, MKL_PACKED) where the plan measured it faster. The
  kernels get MKL's function addresses as int64 numbers in cfg and call
  them through intrinsics, so numba's on-disk cache keeps working; each
  chunk sets MKL to one thread for its own thread.
- Derivatives come from saved outputs (tanh' = 1 - h^2, sigmoid' = s(1-s)).
- The GRU (gates r, z, n) keeps its recurrent product W_hh h_{t-1} apart
  from the input projection, as PyTorch does, because r multiplies its n
  block (W_hn h + b_hn, saved in HN for the backward); its BPTT has two
  sets of deltas: the input side (DELTA: dW_ih, db_ih, the input gradient)
  and the recurrent side (DELTAH: dW_hh, db_hh, dL/dh_{t-1}).
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
from llvmlite import binding as _llvm
from numba import carray, njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from . import _mkl, _plan, ctx_state

name = "numba"

# ---- cfg header indices ----------------------------------------------------
C_T, C_B, C_I, C_H, C_L, C_D, C_MODE, C_BIAS, C_TOK, C_O, C_READOUT, C_LOSS, \
    C_OPT, C_CLIP, C_SCLIP, C_STEP, C_FAST, C_SPARE, C_WOUT, C_BOUT, C_NC, \
    C_NCG, C_PAR, C_MKL, C_MKL_GEMM, C_MKL_PACK, C_MKL_COMP, C_MKL_PACKN, \
    C_MKL_LOCAL, C_RC = range(30)
C_POFF = 32            # poff (L*D, 4) flattened from here
# cfg[C_MKL:C_MKL + 6] is what the recurrences get of MKL ("mk"): flags (which
# products call MKL), the addresses of cblas_?gemm, cblas_?gemm_pack,
# cblas_?gemm_compute for the dtype, the size (elements) of one chunk's slot
# in the workspace section PACK, the address of MKL_Set_Num_Threads_Local.
MK_FWD, MK_BWD, MK_PACKED = 1, 2, 4
# Not MKL: the LSTM forward recurrence on the tiled, fused kernel
# (_lstm_recur_tiled); a strategy of the plan like the MKL flags.
MK_FUSED = 8
# Not MKL: both per-step products on the register-tiled kernel of packed
# panels (_gemm_packed; W_hh packed once per call by _mkl_pack_w).
MK_TILE = 16
MK_MKL = MK_FWD | MK_BWD
# ---- fcfg indices ----------------------------------------------------------
F_LR, F_MOM, F_B1, F_B2, F_EPS, F_LIMIT, F_SCLIP = range(7)
# ---- result indices --------------------------------------------------------
R_LOSS, R_GNORM, R_CLIPPED, R_SKIPPED = range(4)

LSTM = 3
GRU = 4
# The batch's fixed partition for the recurrences has at most this many
# chunks (chunk_rows), whatever the thread count; the one-off products are
# split over at most this many threads.
SPLIT = 4


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
# "mkl" or "default" (the built-in loops only); set_gemm changes it
_GEMM = "mkl" if _MKL is not None else "default"
# With the engine "mkl", the plan (choose, backends/_plan.py) times the
# per-step products on the loops and on MKL (forward, backward, both) for
# each shape class on this machine and keeps the fastest; FASTRNN_PLAN=off
# keeps the loops. MKL is called with its thread-local setting at one
# thread from inside the chunks. (Measured on an AMD EPYC, MKL loads its
# generic kernels there: the 4x2-blocked loops beat it at most shapes.) The
# one-off products never use MKL. The packed API (W_hh packed once per call,
# reused for the T steps) measured no better than plain ?gemm on the AVX2
# dev machine, so it is off by default; MKL_PACKED = True turns it on.
MKL_PACKED = False
# tests: force these MK_* flags at every shape (None: the plan)
MKL_FORCE = None


def set_gemm(engine):
    """Choose the engine of the per-step products for this process: "mkl"
    or "default" (built-in loops); returns the previous one.
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
    products (MKL where the plan measured it faster, the loops elsewhere)."""
    if _GEMM == "mkl":
        return "mkl (packed)" if MKL_PACKED else "mkl"
    return "default"


def plan_where():
    """Where the plan lives, or why there is none."""
    if not _plan.enabled():
        return "plan: off (FASTRNN_PLAN=off: built-in loops, all threads)"
    try:
        p = _plan.get_plan(_plan_version())
    except Exception as e:  # an unreadable environment: say so, do not fail
        return f"plan: unavailable ({type(e).__name__}: {e})"
    return f"plan: {p.path} ({len(p.entries)} shape classes; `fastrnn tune`)"


def available():
    if _GEMM == "mkl":
        gemm = (f"gemm: {gemm_engine()} for the per-step products where the "
                "plan measured it faster, built-in loops for the rest "
                f"[{_MKL.describe()}]")
    elif _MKL_REQUIRED:
        gemm = f"gemm: MKL required (FASTRNN_MKL=1) but not usable: {_MKL_WHY}"
    else:
        gemm = f"gemm: built-in loops (MKL not used: {_MKL_WHY})"
    return True, "numba imported; " + gemm + "; " + plan_where()


# ============================================================================
# workspace
# ============================================================================
@njit(cache=True)
def _sections(T, B, I, H, L, D, G, O, cell, tok, npack):
    """Sizes (in elements) of the workspace sections, in order; cell: 0 the
    Elman RNN, 1 the LSTM, 2 the GRU."""
    W = max(I, D * H)
    lstm = 1 if cell == 1 else 0
    gated = 1 if cell >= 1 else 0
    gru = 1 if cell == 2 else 0
    s = np.zeros(19, dtype=np.int64)
    s[0] = L * D * (T + 2) * B * H            # HX: hidden states
    s[1] = L * D * (T + 2) * B * H * lstm     # CX: cell states
    s[2] = L * D * T * B * G * H * gated      # GATES: (i, f, g, o) / (r, z, n)
    s[3] = L * D * T * B * H * gated          # TANHC: tanh(c_t) / GRU: HN
    s[4] = L * T * B * D * H                  # LOUT: layer outputs
    s[5] = T * B * G * H                      # DELTA: dL/da_t, one direction
    s[6] = T * B * W                          # DA: d layer output
    s[7] = T * B * W                          # DB: d layer input
    s[8] = T * B * W                          # TMP: product scratch
    s[9] = (G * H + max(H, I, D * H)) * WG_ROWS  # WG: blocks of _wgrad_nt
    s[10] = 2 * B * H                         # DH: dh, dc carried back
    s[11] = max(max(I, D * H) * G * H, O * D * H)  # WT: a weight transposed
    s[12] = I * G * H * tok                   # DWT: token-gradient rows
    s[13] = T * B * O                         # Z: read-out
    s[14] = T * B * O                         # DZ
    s[15] = B * D * H                         # HLAST
    s[16] = 2 * T * B * O                     # ZS: exp scratch of the loss
    s[17] = npack                             # PACK: MKL packed W_hh, per chunk
    s[18] = T * B * G * H * gru               # DELTAH: GRU recurrent-side deltas
    return s


@njit(cache=True)
def _section(ws, sizes, j):
    """Section j of the workspace; every section starts at a multiple of
    16 elements (64 bytes of float32 from the aligned base, see _prepare)."""
    off = 0
    for i in range(j):
        off += (sizes[i] + 15) // 16 * 16
    return ws[off:off + sizes[j]]


def workspace_size(T, B, I, H, L, D, G, O, cell, tok, npack=0):
    # _sections as plain Python: calling the compiled one here would load
    # (and type) a second entry point from numba's cache at start-up
    s = _sections.py_func(int(T), int(B), int(I), int(H), int(L), int(D),
                          int(G), int(O), int(cell), int(tok), int(npack))
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
    """out = f'(a) * dh with f'(a) from h = f(a); relu' is (h > 0) as a
    number, so that 0 * NaN is NaN as in NumPy."""
    n = h.shape[0]
    if mode == 0:
        for j in range(n):
            out[j] = (1 - h[j] * h[j]) * dh[j]
    elif mode == 1:
        for j in range(n):
            out[j] = (1.0 if h[j] > 0 else 0.0) * dh[j]
    else:
        for j in range(n):
            out[j] = h[j] * (1 - h[j]) * dh[j]


# ============================================================================
# products
# ============================================================================
@njit(cache=True, fastmath={"contract", "reassoc", "nsz"})
def _addmm_nt(A, W, C):
    """C += A @ W.T, A: (M, K), W: (N, K) row-major, C: (M, N): the per-step
    products (W_hh as stored forward, W_hh transposed backward) and the
    blocked weight gradients. Explicit loops: vectorised dot products, a
    block of 4 rows of A by 2 rows of W at a time (8 sums in registers:
    6 loads per 8 multiply-adds; 1.3-2.3x the 4 x 1 blocking on one AVX-512
    core). Rows m = 0, 4, 8, ... start the blocks of 4, so a row's sums
    depend on its index in A only: callers split A at multiples of 4 rows
    to keep results independent of the split."""
    M, K = A.shape
    N = W.shape[0]
    m = 0
    while m + 4 <= M:
        a0 = A[m]
        a1 = A[m + 1]
        a2 = A[m + 2]
        a3 = A[m + 3]
        n = 0
        while n + 2 <= N:
            w = W[n]
            v = W[n + 1]
            s0 = C[m, n]
            s1 = C[m + 1, n]
            s2 = C[m + 2, n]
            s3 = C[m + 3, n]
            t0 = C[m, n + 1]
            t1 = C[m + 1, n + 1]
            t2 = C[m + 2, n + 1]
            t3 = C[m + 3, n + 1]
            for k in range(K):
                wk = w[k]
                vk = v[k]
                x0 = a0[k]
                x1 = a1[k]
                x2 = a2[k]
                x3 = a3[k]
                s0 += x0 * wk
                s1 += x1 * wk
                s2 += x2 * wk
                s3 += x3 * wk
                t0 += x0 * vk
                t1 += x1 * vk
                t2 += x2 * vk
                t3 += x3 * vk
            C[m, n] = s0
            C[m + 1, n] = s1
            C[m + 2, n] = s2
            C[m + 3, n] = s3
            C[m, n + 1] = t0
            C[m + 1, n + 1] = t1
            C[m + 2, n + 1] = t2
            C[m + 3, n + 1] = t3
            n += 2
        if n < N:
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
        n = 0
        while n + 2 <= N:
            w = W[n]
            v = W[n + 1]
            s0 = c[n]
            t0 = c[n + 1]
            for k in range(K):
                s0 += a[k] * w[k]
                t0 += a[k] * v[k]
            c[n] = s0
            c[n + 1] = t0
            n += 2
        if n < N:
            w = W[n]
            acc = c[n]
            for k in range(K):
                acc += a[k] * w[k]
            c[n] = acc
        m += 1


# ---- register-tiled products on packed panels --------------------------------
# C += A @ W.T as an outer-product micro-kernel: W is packed once into
# panels of GEMM_NR columns of W.T (contiguous (K, GEMM_NR) blocks, zero
# padded), and a GEMM_MR x GEMM_NR block of C stays in registers while k
# runs: per k, GEMM_MR broadcasts of A and GEMM_NR / vector-width loads of
# the panel feed GEMM_MR * GEMM_NR fused multiply-adds. The block lives in a
# stack array indexed only by constants (_tile_stack), which LLVM promotes
# to registers (a heap array would be stored back every k). GEMM_NR is 32
# on AVX-512 hosts (2 zmm per row in float32, 8 accumulators) and 16
# otherwise (AVX2: 2 ymm per row). Each element of C is its k-ordered chain
# of fused multiply-adds, whatever the block or the rows around it, so the
# result is bitwise the same however the rows are split.
GEMM_MR = 4


def _target_avx512():
    """Whether numba compiles for AVX-512: NUMBA_CPU_NAME (a portable
    build, e.g. "haswell" or "generic") with NUMBA_CPU_FEATURES when set,
    else the host."""
    if numba.config.CPU_NAME:
        return "+avx512f" in (numba.config.CPU_FEATURES or "")
    return bool(_llvm.get_host_cpu_features().get("avx512f", False))


GEMM_NR = 32 if _target_avx512() else 16


@intrinsic
def _tile_stack(typingctx, A):
    """A pointer to GEMM_MR * GEMM_NR elements of A's dtype on the stack
    (in the calling function's entry block)."""
    ty = A.dtype
    sig = types.CPointer(ty)(A)

    def codegen(context, builder, sig, args):
        lty = context.get_value_type(ty)
        p = cgutils.alloca_once(builder, ir.ArrayType(lty, GEMM_MR * GEMM_NR))
        return builder.bitcast(p, lty.as_pointer())
    return sig, codegen


@njit(cache=True)
def _panels(buf, N, K):
    """The (P, K, GEMM_NR) view of buf that holds W (N, K) packed in
    panels. The callers of _gemm_packed take it (a reshape inside the
    kernel kept LLVM from holding the block of C in registers)."""
    P = -(-N // GEMM_NR)
    return buf[:P * K * GEMM_NR].reshape((P, K, GEMM_NR))


@njit(cache=True, parallel=True)
def _pack_panels(W, out):
    """Pack W (N, K) into panels, out = _panels(buf, N, K): panel p, row k
    holds W[p*GEMM_NR:(p+1)*GEMM_NR, k], zero padded past N. Panels split
    over the cores; within one, k outer: GEMM_NR rows of W are read along
    while each panel row is written in one piece."""
    N, K = W.shape
    for p in prange(out.shape[0]):
        n0 = p * GEMM_NR
        nn = min(GEMM_NR, N - n0)
        o = out[p]
        for k in range(K):
            ok = o[k]
            for j in range(nn):
                ok[j] = W[n0 + j, k]
            for j in range(nn, GEMM_NR):
                ok[j] = 0


@njit(cache=True)
def _pack_shared(mk, W, pack):
    """With MK_TILE, W packed once into the workspace section PACK for all
    the chunks of a recurrence (W_hh forward, W_hh.T backward): it is the
    same for every step and every chunk."""
    if mk[0] & MK_TILE:
        _pack_panels(W, _panels(_pack_slot(pack, mk, 0), W.shape[0],
                                W.shape[1]))


@njit(cache=True, fastmath={"contract"})
def _gemm_packed(A, Wp, C):
    """C += A @ W.T for A: (M, K), C: (M, N) and W (N, K) packed in the
    panels Wp by _pack_panels. Blocks of GEMM_MR rows of A (a last, short
    block reads its last row again and drops those sums) by one panel."""
    M, K = A.shape
    N = C.shape[1]
    acc = carray(_tile_stack(A), (GEMM_MR, GEMM_NR))
    out = carray(_tile_stack(A), (GEMM_MR, GEMM_NR))
    for p in range(Wp.shape[0]):
        n0 = p * GEMM_NR
        nn = min(GEMM_NR, N - n0)
        Bp = Wp[p]
        for m in range(0, M, GEMM_MR):
            a0 = A[m]
            a1 = A[min(m + 1, M - 1)]
            a2 = A[min(m + 2, M - 1)]
            a3 = A[min(m + 3, M - 1)]
            for i in range(GEMM_MR):
                for j in range(GEMM_NR):
                    acc[i, j] = 0
            for k in range(K):
                b = Bp[k]
                x0 = a0[k]
                x1 = a1[k]
                x2 = a2[k]
                x3 = a3[k]
                for j in range(GEMM_NR):
                    bj = b[j]
                    acc[0, j] += x0 * bj
                    acc[1, j] += x1 * bj
                    acc[2, j] += x2 * bj
                    acc[3, j] += x3 * bj
            for i in range(GEMM_MR):
                for j in range(GEMM_NR):
                    out[i, j] = acc[i, j]
            for i in range(min(GEMM_MR, M - m)):
                c = C[m + i]
                for j in range(nn):
                    c[n0 + j] += out[i, j]


# Column blocks of the axpy-form products (_gemm_nn, _gemm_tn): 4 rows of C
# of this many elements stay in L1 while the k (or r) loop runs; row blocks
# of _gemm_tn: this many rows of Bm stay in L2 across the blocks of C.
NB_COLS = 256
RB_ROWS = 128


@njit(cache=True, fastmath={"contract"})
def _gemm_nn(A, Bm, C, acc, m0, m1):
    """Rows [m0, m1) of C (+)= A @ Bm (acc: add to C, else overwrite); A: (M,
    K), Bm: (K, N) row-major. The backward per-step product and the one-off
    products. Each element of C is its k-ordered sum of fused multiply-adds
    (4 rows of C share each row of Bm; vectorised over columns, never across
    k), so the result is bitwise the same however the rows are split."""
    K = A.shape[1]
    N = Bm.shape[1]
    for n0 in range(0, N, NB_COLS):
        n1 = min(N, n0 + NB_COLS)
        nn = n1 - n0
        m = m0
        while m < m1:
            q = min(4, m1 - m)
            if q == 4:
                c0 = C[m, n0:n1]
                c1 = C[m + 1, n0:n1]
                c2 = C[m + 2, n0:n1]
                c3 = C[m + 3, n0:n1]
                if not acc:
                    for n in range(nn):
                        c0[n] = 0
                        c1[n] = 0
                        c2[n] = 0
                        c3[n] = 0
                for k in range(K):
                    b = Bm[k, n0:n1]
                    x0 = A[m, k]
                    x1 = A[m + 1, k]
                    x2 = A[m + 2, k]
                    x3 = A[m + 3, k]
                    for n in range(nn):
                        bn = b[n]
                        c0[n] += x0 * bn
                        c1[n] += x1 * bn
                        c2[n] += x2 * bn
                        c3[n] += x3 * bn
            else:
                for mm in range(m, m + q):
                    c = C[mm, n0:n1]
                    if not acc:
                        for n in range(nn):
                            c[n] = 0
                    for k in range(K):
                        b = Bm[k, n0:n1]
                        x = A[mm, k]
                        for n in range(nn):
                            c[n] += x * b[n]
            m += q


@njit(cache=True, fastmath={"contract"})
def _gemm_tn(A, Bm, C, acc, m0, m1):
    """Rows [m0, m1) of C (+)= A.T @ Bm for A: (R, M), Bm: (R, N) row-major
    (the weight gradients: the sum over the T*B stored rows). Each element is
    its r-ordered sum of fused multiply-adds (RB_ROWS rows of Bm at a time,
    kept in L2 across all of C), bitwise the same however C is split."""
    R = A.shape[0]
    N = Bm.shape[1]
    if not acc:
        for m in range(m0, m1):
            C[m] = 0
    for r0 in range(0, R, RB_ROWS):
        r1 = min(R, r0 + RB_ROWS)
        for n0 in range(0, N, NB_COLS):
            n1 = min(N, n0 + NB_COLS)
            nn = n1 - n0
            m = m0
            while m < m1:
                q = min(4, m1 - m)
                if q == 4:
                    c0 = C[m, n0:n1]
                    c1 = C[m + 1, n0:n1]
                    c2 = C[m + 2, n0:n1]
                    c3 = C[m + 3, n0:n1]
                    for r in range(r0, r1):
                        b = Bm[r, n0:n1]
                        x0 = A[r, m]
                        x1 = A[r, m + 1]
                        x2 = A[r, m + 2]
                        x3 = A[r, m + 3]
                        for n in range(nn):
                            bn = b[n]
                            c0[n] += x0 * bn
                            c1[n] += x1 * bn
                            c2[n] += x2 * bn
                            c3[n] += x3 * bn
                else:
                    for mm in range(m, m + q):
                        c = C[mm, n0:n1]
                        for r in range(r0, r1):
                            b = Bm[r, n0:n1]
                            x = A[r, mm]
                            for n in range(nn):
                                c[n] += x * b[n]
                m += q


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
    if mk[0] & MK_MKL == 0:
        return 0
    return _mkl_threads_local(mk[5], 1)


@njit(cache=True)
def _mkl_exit(mk, prev):
    if mk[0] & MK_MKL != 0:
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
    """Chunk c's slot of the workspace section PACK, aligned to 64 bytes
    (with MK_TILE one slot that all chunks share)."""
    if mk[0] & MK_TILE:
        c = 0
    n = mk[4]
    slot = pack[c * n:(c + 1) * n]
    isz = pack.itemsize
    skip = ((64 - _data_address(slot) % 64) % 64) // isz
    return slot[skip:]


@njit(cache=True)
def _mkl_pack_w(mk, W, m, fwd, pbuf):
    """Pack the recurrent weights once for the per-step products of a chunk
    of m rows: forward W = W_hh (GH, H) as op(B) = W_hh.T (C += A @ W_hh.T),
    backward W = W_hh.T (H, GH) as op(B) = W_hh (C = A @ W_hh). Nothing when
    those products do not use packed MKL (MK_TILE: _pack_shared packed W
    for all chunks)."""
    if mk[0] & MK_TILE:
        return
    if fwd and (mk[0] & MK_FWD) and (mk[0] & MK_PACKED):
        GH, H = W.shape
        _mkl_pack(mk[2], _B_MATRIX, _TRANS, m, GH, H, 1.0, W, H, pbuf)
    elif not fwd and (mk[0] & MK_BWD) and (mk[0] & MK_PACKED):
        H, GH = W.shape
        _mkl_pack(mk[2], _B_MATRIX, _TRANS, m, H, GH, 1.0, W, GH, pbuf)


@njit(cache=True)
def _step_nt(mk, A, W, C, pbuf):
    """The forward per-step product C += A @ W.T (A: (m, H) rows of h_{t-1},
    W: W_hh (GH, H), C: (m, GH)): MKL (packed W from _mkl_pack_w, or plain
    sgemm) when mk says so, the packed panels of W (MK_TILE), else
    _addmm_nt."""
    if mk[0] & MK_TILE:
        _gemm_packed(A, _panels(pbuf, W.shape[0], W.shape[1]), C)
        return
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
    _addmm_nt(A, W, C)


@njit(cache=True)
def _step_nn(mk, A, W, C, pbuf):
    """The backward per-step product C = A @ W_hh (A: (m, GH) deltas, W:
    W_hh transposed (H, GH), which core_backward_kernel passes to the
    backward recurrences in W_hh's place; C: (m, H)): MKL when mk says so,
    else the dot-product loops of _addmm_nt along rows of W (1.3-2x the axpy
    form over W_hh's rows); with MK_TILE the packed panels of W."""
    M, K = A.shape
    N = W.shape[0]
    if mk[0] & MK_TILE:
        C[:] = 0
        _gemm_packed(A, _panels(pbuf, N, K), C)
        return
    if mk[0] & MK_BWD:
        if mk[0] & MK_PACKED:
            _mkl_compute(mk[3], _NO_TRANS, _PACKED, M, N, K, A, K, pbuf, K,
                         0.0, C, N)
        else:
            _mkl_gemm(mk[1], _NO_TRANS, _TRANS, M, N, K, 1.0, A, K, W, K,
                      0.0, C, N)
        return
    C[:] = 0
    _addmm_nt(A, W, C)


# ---- one-off products split over the cores ---------------------------------
# No external BLAS anywhere in the kernels: numba's np.dot calls SciPy's
# OpenBLAS, whose thread count is process-wide state (pinning it per call
# was not thread-safe) and whose results change bitwise with that count.
# The one-off products run on _gemm_nn/_gemm_tn, rows of C split over the
# cores; their results do not depend on the split. Products below PAR_MACS
# multiply-adds are not worth a parallel region.
PAR_MACS = 1 << 20


@njit(cache=True, parallel=True)
def _pgemm(tn, A, Bm, C, acc, nc, par):
    """C (+)= A @ Bm (tn: A.T @ Bm), rows of C split over nc cores when the
    product has at least `par` multiply-adds (bitwise the same either way)."""
    M, N = C.shape
    K = A.shape[0] if tn else A.shape[1]
    if M * K * N < par or M < 4 * nc:
        nc = 1
    for c in prange(nc):
        m0 = c * M // nc
        m1 = (c + 1) * M // nc
        if tn:
            _gemm_tn(A, Bm, C, acc, m0, m1)
        else:
            _gemm_nn(A, Bm, C, acc, m0, m1)


@njit(cache=True, parallel=True)
def _pgemm_nt(A, W, C, acc, nc, par):
    """C (+)= A @ W.T (W: (N, K) row-major) by the dot-product loops of
    _addmm_nt, for narrow C with long sums (the input gradient); rows of C
    split over nc cores at multiples of 4 rows, so the 4-row blocks and the
    bits are those of one core."""
    M, N = C.shape
    if M * A.shape[1] * N < par or M < 8 * nc:
        nc = 1
    for c in prange(nc):
        m0 = (c * M // nc) // 4 * 4
        m1 = M if c == nc - 1 else ((c + 1) * M // nc) // 4 * 4
        if not acc:
            for m in range(m0, m1):
                C[m] = 0
        _addmm_nt(A[m0:m1], W, C[m0:m1])


# rows of the stored deltas / states per block of the blocked weight
# gradient (_wgrad_nt): both blocks transposed fit in L2 with room
WG_ROWS = 256


@njit(cache=True, parallel=True)
def _wgrad_nt(A, Bm, C, scratch, nc):
    """C = A.T @ Bm (A: (R, M), Bm: (R, N)) as dot products: WG_ROWS rows
    of A and Bm at a time are transposed into scratch ((M + N) * WG_ROWS)
    and C += At @ Bt.T runs on the register-blocked loops of _addmm_nt,
    rows of C split over nc cores at multiples of 4 (the same bits for any
    split). Dot products run from L1 and L2; the axpy form of _gemm_tn
    stores C for every row it adds."""
    R, M = A.shape
    N = Bm.shape[1]
    for c in prange(nc):
        for m in range(c * M // nc, (c + 1) * M // nc):
            C[m] = 0
    for r0 in range(0, R, WG_ROWS):
        kb = min(WG_ROWS, R - r0)
        At = scratch[:M * kb].reshape((M, kb))
        Bt = scratch[M * kb:(M + N) * kb].reshape((N, kb))
        for c in prange(nc):
            for m in range(c * M // nc, (c + 1) * M // nc):
                a = At[m]
                for r in range(kb):
                    a[r] = A[r0 + r, m]
            for n in range(c * N // nc, (c + 1) * N // nc):
                b = Bt[n]
                for r in range(kb):
                    b[r] = Bm[r0 + r, n]
        for c in prange(nc):
            m0 = (c * M // nc) // 4 * 4
            m1 = M if c == nc - 1 else ((c + 1) * M // nc) // 4 * 4
            _addmm_nt(At[m0:m1], Bt, C[m0:m1])


@njit(cache=True, parallel=True)
def _wgrad_tiled(A, Bm, C, scratch, nc):
    """C = A.T @ Bm (A: (R, M), Bm: (R, N)) on the register-tiled kernel:
    per block of kb rows (at most WG_ROWS, as scratch ((M + N) * WG_ROWS)
    allows), A's block transposed to (M, kb) and Bm's copied into panels
    (rows of Bm are already the panels' rows), then C += At @ panels with
    rows of C split over nc cores. kb depends on the shapes only and each
    element is its k-ordered sum per block, so the bits do not depend on
    the split."""
    R, M = A.shape
    N = Bm.shape[1]
    P = -(-N // GEMM_NR)
    kb = min(WG_ROWS, scratch.size // (M + P * GEMM_NR))
    for c in prange(nc):
        for m in range(c * M // nc, (c + 1) * M // nc):
            C[m] = 0
    for r0 in range(0, R, kb):
        k1 = min(kb, R - r0)
        At = scratch[:M * k1].reshape((M, k1))
        Wp = _panels(scratch[M * k1:], N, k1)
        for c in prange(nc):
            for m in range(c * M // nc, (c + 1) * M // nc):
                a = At[m]
                for r in range(k1):
                    a[r] = A[r0 + r, m]
            for p in range(c * P // nc, (c + 1) * P // nc):
                n0 = p * GEMM_NR
                nn = min(GEMM_NR, N - n0)
                o = Wp[p]
                for r in range(k1):
                    b = Bm[r0 + r]
                    orow = o[r]
                    for j in range(nn):
                        orow[j] = b[n0 + j]
                    for j in range(nn, GEMM_NR):
                        orow[j] = 0
        for c in prange(nc):
            m0 = c * M // nc
            m1 = (c + 1) * M // nc
            _gemm_packed(At[m0:m1], Wp, C[m0:m1])


@njit(cache=True)
def _weight_grad(A, Bm, C, scratch, wscratch, nc, par, tile):
    """C = A.T @ Bm for a weight gradient. Wide ones (both sides >= 64) by
    _wgrad_tiled when `tile` (MK_TILE), else the blocked dot products of
    _wgrad_nt (wscratch); a narrow one (C: (M,
    N < 64), the gradient of W_ih from a small input) as (Bm.T @ A).T, whose
    rows are long (the axpy loops of _gemm_tn run along them); else _gemm_tn."""
    M, N = C.shape
    if M >= 64 and N >= 64:
        if tile:
            _wgrad_tiled(A, Bm, C, wscratch, nc)
        else:
            _wgrad_nt(A, Bm, C, wscratch, nc)
        return
    if N >= 64 or M <= N:
        _pgemm(True, A, Bm, C, False, nc, par)
        return
    Ct = scratch[:N * M].reshape((N, M))
    _pgemm(True, Bm, A, Ct, False, nc, par)
    for m in range(M):
        for n in range(N):
            C[m, n] = Ct[n, m]


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
    """dst[:K*N].reshape(K, N) = W.T for W (N, K); returns the view. In
    32 x 32 tiles, so that reads and writes both stay in L1 (W_hh of an
    LSTM at H = 512, 1M elements: an element-wise transpose took ms)."""
    N, K = W.shape
    out = dst[:K * N].reshape((K, N))
    for n0 in range(0, N, 32):
        n1 = min(N, n0 + 32)
        for k0 in range(0, K, 32):
            k1 = min(K, k0 + 32)
            for k in range(k0, k1):
                o = out[k]
                for n in range(n0, n1):
                    o[n] = W[n, k]
    return out


@njit(cache=True)
def _project(x, tok, W_ih, b_ih, b_hh, bias, hh_cols, dst, wt, nc, par):
    """dst (T*B, G*H) = x @ W_ih.T + b_ih + b_hh, b_hh in the first hh_cols
    columns only (the GRU's n block gets b_hn in its recurrent term); token
    ids gather rows of W_ih.T (wt: scratch for W_ih transposed)."""
    GH = W_ih.shape[0]
    if tok.shape[0] > 0:
        WT = _transpose_into(W_ih, wt)
        for r in range(tok.shape[0]):
            src = WT[tok[r]]
            d = dst[r]
            for j in range(GH):
                d[j] = src[j]
    elif x.shape[1] >= 64:    # long sums: dot products along W_ih's rows
        _pgemm_nt(x, W_ih, dst, False, nc, par)
    else:                     # short ones: axpy over rows of W_ih.T
        _pgemm(False, x, _transpose_into(W_ih, wt), dst, False, nc, par)
    if bias:
        for r in range(dst.shape[0]):
            d = dst[r]
            for j in range(hh_cols):
                d[j] += b_ih[j] + b_hh[j]
            for j in range(hh_cols, GH):
                d[j] += b_ih[j]


# ============================================================================
# one direction of one layer: forward and backward side by side
# ============================================================================
@njit(cache=True)
def _rnn_recur(mode, fast, rev, lengths, W_hh, HX, lout, col, co,
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
    fscr = np.empty(n * H, dtype=HX.dtype)
    ibuf = np.empty(n * H, dtype=np.int32)
    for s in range(T):
        t = T - 1 - s if rev else s
        tp = t + 2 if rev else t
        C = HX[t + 1, r0:r1]
        _step_nt(mk, HX[tp, r0:r1], W_hh, C, pbuf)
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
def _take_dh(d, g, sclip, use_sclip):
    """dL/dh_t of one row at the top of a BPTT step: d (carried back from
    t+1) += g (from the layer above or the read-out), clamped to
    [-sclip, sclip] when use_sclip (state_clip); returns its squared norm
    (gradient_flow)."""
    for j in range(d.shape[0]):
        d[j] += g[j]
    if use_sclip:
        for j in range(d.shape[0]):
            d[j] = min(max(d[j], -sclip), sclip)
    acc = 0.0
    for j in range(d.shape[0]):
        acc += np.float64(d[j]) * d[j]
    return acc


@njit(cache=True)
def _rnn_back_recur(mode, rev, lengths, W_hh, HX, dlout, col, dh,
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
                flow[t] += _take_dh(d, dlout[t, b, col:col + H], sclip, use_sclip)
                _dact_mul_row(mode, HX[t + 1, b], d, dl)
            else:
                for j in range(H):
                    dl[j] = 0
        # dh_{t-1} = delta_t @ W_hh for valid rows; padding rows pass through
        _step_nn(mk, DELTA[t, r0:r1], W_hh, nxt, pbuf)
        for b in range(r0, r1):
            if t < lengths[b]:
                dh[b] = nxt[b - r0]


# Hidden units per tile of the fused LSTM forward (_lstm_recur_tiled): the
# tile's 4 * LSTM_TILE gate columns of a chunk's rows stay in L1 from the
# product to the cell update, and its 4 * LSTM_TILE rows of W_hh in L2
# while the chunk's row blocks pass over them (32 and 64 measured alike).
LSTM_TILE = 64


@njit(cache=True)
def _tile_order(W, dst):
    """W_hh (4H, H) with its rows regrouped per tile of LSTM_TILE hidden
    units (into dst): the tile starting at unit j0, of width w, is the rows
    [4 j0, 4 j0 + 4 w), gate g's rows at 4 j0 + g w + jj = W[g H + j0 + jj].
    The weights of _lstm_recur_tiled, one copy per call."""
    GH, H = W.shape
    Hu = GH // 4
    out = dst[:GH * H].reshape((GH, H))
    for j0 in range(0, Hu, LSTM_TILE):
        w = min(LSTM_TILE, Hu - j0)
        for g in range(4):
            for jj in range(w):
                src = W[g * Hu + j0 + jj]
                o = out[4 * j0 + g * w + jj]
                for k in range(H):
                    o[k] = src[k]
    return out


@njit(cache=True)
def _lstm_recur_tiled(fast, rev, lengths, WP, GATES, HX, CX, TC, lout, col,
                      r0, r1):
    """The LSTM forward recurrence of rows [r0, r1) (as _lstm_recur) with
    the pointwise work fused into the per-step product: for each tile of
    LSTM_TILE hidden units, the tile's 4 gate blocks (WP: W_hh in
    _tile_order) are computed into a small buffer (the projection as the
    initial sums), activated, and the cell, tanh(c) and h of those units
    updated while the buffer is in L1; no pass over the whole (rows, 4H)
    block per step."""
    T = HX.shape[0] - 2
    H = HX.shape[2]
    n = r1 - r0
    JT = min(LSTM_TILE, H)
    dt = HX.dtype
    tb = np.empty(n * 4 * JT, dtype=dt)
    cb = np.empty(n * JT, dtype=dt)
    tcb = np.empty(n * JT, dtype=dt)
    fscr = np.empty(n * 4 * JT, dtype=dt)
    ibuf = np.empty(n * 4 * JT, dtype=np.int32)
    wl = H - (H - 1) // JT * JT          # width of the last tile
    co = _act_coefs(LSTM, n, JT, 4, dt)
    col_ = _act_coefs(LSTM, n, wl, 4, dt)
    cot = _act_coefs(0, n, JT, 1, dt)
    for s in range(T):
        t = T - 1 - s if rev else s
        tp = t + 2 if rev else t
        A = HX[tp, r0:r1]
        for j0 in range(0, H, JT):
            w = min(JT, H - j0)
            C = tb[:n * 4 * w].reshape((n, 4 * w))
            for b in range(n):
                a = GATES[t, r0 + b]
                cr = C[b]
                for g in range(4):
                    for jj in range(w):
                        cr[g * w + jj] = a[g * H + j0 + jj]
            _addmm_nt(A, WP[4 * j0:4 * (j0 + w)], C)
            flat = tb[:n * 4 * w]
            _act_block(fast, False, flat, flat, co if w == JT else col_,
                       fscr, ibuf)
            for b in range(n):
                cr = C[b]
                cp = CX[tp, r0 + b]
                c = cb[b * w:(b + 1) * w]
                for jj in range(w):
                    c[jj] = cr[w + jj] * cp[j0 + jj] + cr[jj] * cr[2 * w + jj]
            _act_block(fast, False, cb[:n * w], tcb[:n * w], cot, fscr, ibuf)
            for b in range(n):
                rb = r0 + b
                cr = C[b]
                a = GATES[t, rb]
                for g in range(4):
                    for jj in range(w):
                        a[g * H + j0 + jj] = cr[g * w + jj]
                h = HX[t + 1, rb]
                c = CX[t + 1, rb]
                tc = TC[t, rb]
                o_ = lout[t, rb, col:col + H]
                if t < lengths[rb]:
                    for jj in range(w):
                        c[j0 + jj] = cb[b * w + jj]
                        tc[j0 + jj] = tcb[b * w + jj]
                        hv = cr[3 * w + jj] * tcb[b * w + jj]
                        h[j0 + jj] = hv
                        o_[j0 + jj] = hv
                else:
                    hp = HX[tp, rb]
                    cp = CX[tp, rb]
                    for jj in range(w):
                        c[j0 + jj] = cp[j0 + jj]
                        tc[j0 + jj] = tcb[b * w + jj]
                        h[j0 + jj] = hp[j0 + jj]
                        o_[j0 + jj] = 0


@njit(cache=True)
def _lstm_recur(fast, rev, lengths, W_hh, GATES, HX, CX, TC, lout,
                col, co, cot, r0, r1, mk, pbuf):
    """LSTM recurrence of one direction for batch rows [r0, r1), gates in
    PyTorch's order (i, f, g, o). GATES: (T, B, 4H) holds the input
    projection (+ biases) on entry and the gate activations on exit; HX/CX:
    (T+2, B, H) the states (h0, c0 already in place), TC: (T, B, H) tanh(c_t).
    Activations run once per step over whole blocks (co: gate coefficients,
    cot: tanh). With MK_FUSED in mk, W_hh is in _tile_order and the tiled,
    fused kernel runs instead."""
    if mk[0] & MK_FUSED:
        _lstm_recur_tiled(fast, rev, lengths, W_hh, GATES, HX, CX, TC, lout,
                          col, r0, r1)
        return
    T = HX.shape[0] - 2
    H = HX.shape[2]
    n = r1 - r0
    _mkl_pack_w(mk, W_hh, n, True, pbuf)
    fscr = np.empty(n * 4 * H, dtype=HX.dtype)
    ibuf = np.empty(n * 4 * H, dtype=np.int32)
    for s in range(T):
        t = T - 1 - s if rev else s
        tp = t + 2 if rev else t
        Gt = GATES[t, r0:r1]
        _step_nt(mk, HX[tp, r0:r1], W_hh, Gt, pbuf)
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
def _lstm_back_recur(rev, lengths, W_hh, GATES, CX, TC, dlout, col,
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
                flow[t] += _take_dh(d, dlout[t, b, col:col + H], sclip, use_sclip)
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
        _step_nn(mk, DELTA[t, r0:r1], W_hh, nxt, pbuf)
        for b in range(r0, r1):
            if t < lengths[b]:
                dh[b] = nxt[b - r0]


@njit(cache=True)
def _gru_recur(fast, rev, lengths, W_hh, b_hn, GATES, HX, HN, lout, col, co,
               cot, r0, r1, mk, pbuf):
    """GRU recurrence of one direction for batch rows [r0, r1), gates in
    PyTorch's order (r, z, n):
        r = s(a_r + p_r),  z = s(a_z + p_z),  n = tanh(a_n + r (p_n + b_hn)),
        h_t = (1 - z) n + z h_{t-1}
    with a = GATES[t] on entry (W_ih x_t + b_ih, + b_hh for r and z) and
    p = W_hh h_{t-1}, this step's product, kept apart from a. GATES holds
    (r, z, n) on exit, HN (T, B, H) p_n + b_hn; b_hn is empty without bias.
    co: sigmoid coefficients, cot: tanh (see _act_coefs)."""
    T = HX.shape[0] - 2
    H = HX.shape[2]
    n = r1 - r0
    _mkl_pack_w(mk, W_hh, n, True, pbuf)
    prod = np.empty((n, 3 * H), dtype=HX.dtype)
    fscr = np.empty(2 * H, dtype=HX.dtype)
    ibuf = np.empty(2 * H, dtype=np.int32)
    for s in range(T):
        t = T - 1 - s if rev else s
        tp = t + 2 if rev else t
        prod[:] = 0
        _step_nt(mk, HX[tp, r0:r1], W_hh, prod, pbuf)
        for b in range(r0, r1):
            a = GATES[t, b]
            p = prod[b - r0]
            hn = HN[t, b]
            for j in range(2 * H):
                a[j] += p[j]
            _act_block(fast, False, a[0:2 * H], a[0:2 * H], co, fscr, ibuf)
            for j in range(H):
                hn[j] = p[2 * H + j] + b_hn[j] if b_hn.shape[0] > 0 else p[2 * H + j]
                a[2 * H + j] += a[j] * hn[j]
            _act_block(fast, False, a[2 * H:3 * H], a[2 * H:3 * H], cot, fscr, ibuf)
            h = HX[t + 1, b]
            hp = HX[tp, b]
            o_ = lout[t, b, col:col + H]
            if t < lengths[b]:
                zg = a[H:2 * H]
                ng = a[2 * H:3 * H]
                for j in range(H):
                    h[j] = (1 - zg[j]) * ng[j] + zg[j] * hp[j]
                    o_[j] = h[j]
            else:
                for j in range(H):
                    h[j] = hp[j]
                    o_[j] = 0


@njit(cache=True)
def _gru_back_recur(rev, lengths, W_hh, GATES, HX, HN, dlout, col, dh, DELTA,
                    DELTAH, sclip, use_sclip, flow, r0, r1, mk, pbuf):
    """BPTT of one GRU direction for batch rows [r0, r1), beside _gru_recur:
        dn = dh (1 - z)(1 - n^2),  dz = dh (h_{t-1} - n) z (1 - z),
        dr = dn (p_n + b_hn) r (1 - r),
        DELTA[t] = (dr, dz, dn)      (input side: dW_ih, db_ih, dx)
        DELTAH[t] = (dr, dz, r dn)   (recurrent side: dW_hh, db_hh)
        dL/dh_{t-1} = dh z + DELTAH[t] @ W_hh.
    dh (B, H) holds dL/dh_T on entry and dL/dh0 on exit; W_hh comes
    transposed (see _step_nn)."""
    T = HX.shape[0] - 2
    H = dh.shape[1]
    _mkl_pack_w(mk, W_hh, r1 - r0, False, pbuf)
    nxt = np.empty((r1 - r0, H), dtype=dh.dtype)
    for s in range(T):
        t = s if rev else T - 1 - s
        tp = t + 2 if rev else t
        for b in range(r0, r1):
            dl = DELTA[t, b]
            dlh = DELTAH[t, b]
            if t < lengths[b]:
                d = dh[b]
                flow[t] += _take_dh(d, dlout[t, b, col:col + H], sclip, use_sclip)
                a = GATES[t, b]
                hn = HN[t, b]
                hp = HX[tp, b]
                for j in range(H):
                    r = a[j]
                    z = a[H + j]
                    nn = a[2 * H + j]
                    dn = d[j] * (1 - z) * (1 - nn * nn)
                    dz = d[j] * (hp[j] - nn) * z * (1 - z)
                    dr = dn * hn[j] * r * (1 - r)
                    dl[j] = dr
                    dl[H + j] = dz
                    dl[2 * H + j] = dn
                    dlh[j] = dr
                    dlh[H + j] = dz
                    dlh[2 * H + j] = r * dn
                    d[j] = d[j] * z
            else:
                for j in range(3 * H):
                    dl[j] = 0
                    dlh[j] = 0
        _step_nn(mk, DELTAH[t, r0:r1], W_hh, nxt, pbuf)
        for b in range(r0, r1):
            if t < lengths[b]:
                d = dh[b]
                q = nxt[b - r0]
                for j in range(H):
                    d[j] += q[j]


# ---- the recurrences, batch rows split into chunks run on separate cores ---
# Batch rows are independent in the recurrence, so each core runs the whole
# time loop for its rows: no synchronisation per step. The chunks are a
# fixed partition of the batch (chunk_rows: rc rows each, the last one
# shorter), whatever the thread count, so results are bitwise the same on 1,
# 2 or 4 threads; numba's scheduler hands the chunks to its threads.
@njit(cache=True, parallel=True)
def _forward_chunks(lstm, mode, fast, rc, nc, rev, lengths, W_hh, GATES,
                    HX, CX, TC, lout, col, co, cot, mk, pack, b_hn):
    """TC is the GRU's HN; b_hn its n block of b_hh (empty without bias)."""
    B = HX.shape[1]
    _pack_shared(mk, W_hh, pack)
    for c in prange(nc):
        r0 = c * rc
        r1 = min(B, r0 + rc)
        pbuf = _pack_slot(pack, mk, c)
        prev = _mkl_enter(mk)
        if mode == GRU:
            _gru_recur(fast, rev, lengths, W_hh, b_hn, GATES, HX, TC, lout,
                       col, co, cot, r0, r1, mk, pbuf)
        elif lstm:
            _lstm_recur(fast, rev, lengths, W_hh, GATES, HX, CX, TC,
                        lout, col, co, cot, r0, r1, mk, pbuf)
        else:
            _rnn_recur(mode, fast, rev, lengths, W_hh, HX, lout, col,
                       co, r0, r1, mk, pbuf)
        _mkl_exit(mk, prev)


@njit(cache=True, parallel=True)
def _backward_chunks(lstm, mode, rc, nc, rev, lengths, W_hh, GATES, HX, CX,
                     TC, dlout, col, dh, dc, DELTA, sclip, use_sclip, flowc,
                     mk, pack, dcs, DELTAH):
    """TC is the GRU's HN; DELTAH its recurrent-side deltas."""
    B = HX.shape[1]
    _pack_shared(mk, W_hh, pack)
    for c in prange(nc):
        r0 = c * rc
        r1 = min(B, r0 + rc)
        pbuf = _pack_slot(pack, mk, c)
        prev = _mkl_enter(mk)
        if mode == GRU:
            _gru_back_recur(rev, lengths, W_hh, GATES, HX, TC, dlout, col, dh,
                            DELTA, DELTAH, sclip, use_sclip, flowc[c], r0, r1,
                            mk, pbuf)
        elif lstm:
            _lstm_back_recur(rev, lengths, W_hh, GATES, CX, TC, dlout,
                             col, dh, dc, DELTA, sclip, use_sclip, flowc[c],
                             r0, r1, mk, pbuf, dcs)
        else:
            _rnn_back_recur(mode, rev, lengths, W_hh, HX, dlout, col, dh,
                            DELTA, sclip, use_sclip, flowc[c], r0, r1, mk,
                            pbuf)
        _mkl_exit(mk, prev)


@njit(cache=True)
def _dir_param_grads(x, tok, rev, HX, DELTA, gW_ih, gW_hh, gb_ih, gb_hh,
                     bias, dwt, wt, wg, nc, par, DELTAH, gru, tile):
    """dW_ih, dW_hh as one product each over all stored deltas (rows of the
    gradient split over the cores; tile: wide ones on _wgrad_tiled); db by
    column sums. The GRU's W_hh and b_hh take the recurrent-side deltas
    DELTAH."""
    T = HX.shape[0] - 2
    B, H = HX.shape[1], HX.shape[2]
    GH = DELTA.shape[2]
    Dl = DELTA.reshape((T * B, GH))
    Dh = DELTAH.reshape((T * B, GH)) if gru else Dl
    hprev = HX[2:T + 2] if rev else HX[0:T]
    _weight_grad(Dh, hprev.reshape((T * B, H)), gW_hh, wt, wg, nc, par, tile)
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
        _weight_grad(Dl, x, gW_ih, wt, wg, nc, par, tile)
    if bias:
        _colsum(Dl, gb_ih)
        if gru:
            _colsum(Dh, gb_hh)
        else:
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
    bias, fast = cfg[C_BIAS] != 0, cfg[C_FAST] != 0
    G = _gates(mode)
    sz = _sections_of(cfg)
    HXall = _section(ws, sz, 0).reshape((L * D, T + 2, B, H))
    nl = L * D if mode == LSTM else 0   # LSTM-only sections are empty otherwise
    ng = L * D if mode >= LSTM else 0   # LSTM and GRU
    CXall = _section(ws, sz, 1).reshape((nl, T + 2, B, H))
    GATESall = _section(ws, sz, 2).reshape((ng, T, B, G * H))
    TCall = _section(ws, sz, 3).reshape((ng, T, B, H))    # GRU: HN
    LOUT = _section(ws, sz, 4).reshape((L, T, B, D * H))
    wt = _section(ws, sz, 11)
    mk = cfg[C_MKL:C_MKL + 6]
    pack = _section(ws, sz, 17)
    co = _act_coefs(mode, B, H, G, flat.dtype)
    cot = _act_coefs(0, B, H, 1, flat.dtype)
    nc = cfg[C_NC]
    ncg = cfg[C_NCG]
    rc = cfg[C_RC]
    lstm = mode == LSTM
    gated = mode >= LSTM
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
            GATES = GATESall[kd] if gated else HX
            CX = CXall[kd] if lstm else HX
            TC = TCall[kd] if gated else HX
            P = GATES.reshape((T * B, GH)) if gated else HX[1:T + 1].reshape((T * B, H))
            # input projection for all T*B rows: one product before the loop
            # (the GRU's b_hn joins its recurrent term instead)
            hh_cols = 2 * H if mode == GRU else GH
            _project(xin, tk, W_ih, b_ih, b_hh, bias, hh_cols, P, wt, ncg,
                     cfg[C_PAR])
            hpos0 = T + 1 if d == 1 else 0
            HX[hpos0] = state0[0, kd]
            if lstm:
                CX[hpos0] = state0[1, kd]
            if lstm and mk[0] & MK_FUSED:    # wt is free after _project
                W_hh = _tile_order(W_hh, wt)
            _forward_chunks(lstm, mode, fast, rc, nc, d == 1, lengths,
                            W_hh, GATES, HX, CX, TC, LOUT[k], d * H, co, cot,
                            mk, pack, b_hh[2 * H:3 * H] if mode == GRU else b_hh[:0])
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
    bias = cfg[C_BIAS] != 0
    use_sclip = cfg[C_SCLIP] != 0
    G = _gates(mode)
    GH = G * H
    has_tok = tok.shape[0] > 0
    sz = _sections_of(cfg)
    HXall = _section(ws, sz, 0).reshape((L * D, T + 2, B, H))
    nl = L * D if mode == LSTM else 0
    ng = L * D if mode >= LSTM else 0
    CXall = _section(ws, sz, 1).reshape((nl, T + 2, B, H))
    GATESall = _section(ws, sz, 2).reshape((ng, T, B, GH))
    TCall = _section(ws, sz, 3).reshape((ng, T, B, H))     # GRU: HN
    LOUT = _section(ws, sz, 4).reshape((L, T, B, D * H))
    DELTA = _section(ws, sz, 5).reshape((T, B, GH))
    gru = mode == GRU
    DELTAH = _section(ws, sz, 18).reshape((T if gru else 0, B, GH))
    DA = _section(ws, sz, 6)
    DB = _section(ws, sz, 7)
    DH = _section(ws, sz, 10).reshape((2, B, H))
    dwt = _section(ws, sz, 12)
    wt = _section(ws, sz, 11)
    mk = cfg[C_MKL:C_MKL + 6]
    pack = _section(ws, sz, 17)
    nc = cfg[C_NC]
    ncg = cfg[C_NCG]
    rc = cfg[C_RC]
    lstm = mode == LSTM
    gated = mode >= LSTM
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
            # the backward recurrences get W_hh transposed (see _step_nn)
            _backward_chunks(lstm, mode, rc, nc, d == 1, lengths,
                             _transpose_into(W_hh, wt),
                             GATESall[kd] if gated else HX, HX,
                             CXall[kd] if lstm else HX,
                             TCall[kd] if gated else HX, dl, d * H, dh, dc,
                             DELTA, sclip, use_sclip, flowc, mk, pack,
                             dcs if k == L - 1 else dcs[:0], DELTAH)
            if k == L - 1:
                for c in range(nc):
                    for t in range(T):
                        flow[t] += flowc[c, t]
            if lstm:
                dstate0[1, kd] = dc
            dstate0[0, kd] = dh
            _dir_param_grads(xin, tk, d == 1, HXall[kd], DELTA, gW_ih, gW_hh,
                             gb_ih, gb_hh, bias, dwt, wt, _section(ws, sz, 9),
                             ncg, cfg[C_PAR], DELTAH, gru, mk[0] & MK_TILE)
            # gradient of this layer's input (not for token ids, nor when the
            # caller passes an empty dx: training needs no input gradient)
            if not (k == 0 and (has_tok or dx.shape[0] == 0)):
                Dl = DELTA.reshape((T * B, GH))
                _pgemm_nt(Dl, _transpose_into(W_ih, wt), din, d > 0, ncg,
                          cfg[C_PAR])
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
            # (softmax - onehot) first, then / B: with one class the
            # gradient is exactly 0, as in the reference
            sc = 1.0 / acc
            for o in range(O):
                d[o] = d[o] * sc
            d[y] -= 1
            for o in range(O):
                d[o] = d[o] * inv_b
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
        z[:] = 0
        _addmm_nt(hl, W, z)
        for b in range(B):
            for o in range(O):
                z[b, o] += bout[o]
        return z
    z = _section(ws, sz, 13).reshape((T * B, O))
    _pgemm_nt(top.reshape((T * B, DH)), W, z, False, cfg[C_NCG], cfg[C_PAR])
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
    cell = 1 if mode == LSTM else 2 if mode == GRU else 0
    return _sections(cfg[C_T], cfg[C_B], cfg[C_I], cfg[C_H], cfg[C_L],
                     cfg[C_D], _gates(mode), cfg[C_O], cell,
                     cfg[C_TOK], _pack_elems(cfg))


@njit(cache=True)
def _pack_elems(cfg):
    """Elements of the workspace section PACK: a slot per chunk (MKL's packed
    W_hh), or one slot all the chunks share with MK_TILE (_pack_slot)."""
    slots = 1 if cfg[C_MKL] & MK_TILE else cfg[C_NC]
    return slots * cfg[C_MKL_PACKN]


@njit(cache=True)
def _gates(mode):
    """Gate blocks G: 4 for the LSTM, 3 for the GRU, 1 for the Elman RNN."""
    return 4 if mode == LSTM else 3 if mode == GRU else 1


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
        _gemm_tn(dz, hl, gW, False, 0, O)
        dh = _section(ws, sz, 8)[:B * DH].reshape((B, DH))
        _gemm_nn(dz, W, dh, False, 0, B)
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
        _pgemm(True, dz, top.reshape((T * B, DH)), gW, False, cfg[C_NCG],
               cfg[C_PAR])
        _pgemm(False, dz, W, dtop.reshape((T * B, DH)), False, cfg[C_NCG],
               cfg[C_PAR])
    gb[:] = 0
    for r in range(dz.shape[0]):
        for o in range(O):
            gb[o] += dz[r, o]
    return loss * inv_b


@njit(cache=True, error_model="numpy")
def _updated(opt, j, flat, grad, m, v, k):
    """Element j after one optimizer update: (param, m, v) in the arrays'
    dtype, nothing written. k = (lr, momentum, beta1, beta2, eps,
    lr / (1 - beta1^t), sqrt(1 - beta2^t)). IEEE arithmetic: 0/0 is NaN."""
    t = flat.dtype.type
    lr, mu, b1, b2, eps, step_size, bc2s = k
    g = grad[j]
    if opt == 0:
        if mu != 0:
            mj = t(mu * m[j] + g)        # PyTorch: buf = g at step 1 (m = 0)
            return t(flat[j] - lr * mj), mj, v[j]
        return t(flat[j] - lr * g), m[j], v[j]
    if opt == 1:
        mj = t(b1 * m[j] + (1 - b1) * g)
        vj = t(b2 * v[j] + (1 - b2) * g * g)
        return t(flat[j] - step_size * mj / (math.sqrt(vj) / bc2s + eps)), mj, vj
    sj = t(m[j] + g * g)
    return t(flat[j] - lr * g / (math.sqrt(sj) + eps)), sj, v[j]


@njit(cache=True, error_model="numpy")
def clip_update_kernel(cfg, fcfg, flat, grad, opt_state, res):
    """Global norm, finiteness guard, clipping and the optimizer update, each
    one loop over the flat arrays. res[R_LOSS] must hold the loss already.
    The update is atomic: a first pass computes every new value without
    writing and skips the step (res[R_SKIPPED]) if any parameter or moment
    would be non-finite; only then a second pass writes them."""
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
    m = opt_state[0]
    v = opt_state[1]
    opt = cfg[C_OPT]
    lr, mu = fcfg[F_LR], fcfg[F_MOM]
    b1, b2 = fcfg[F_B1], fcfg[F_B2]
    step_size, bc2s = 0.0, 1.0
    if opt == 1:
        step = cfg[C_STEP]
        step_size = lr / (1 - b1 ** step)
        bc2s = math.sqrt(1 - b2 ** step)
    k = (lr, mu, b1, b2, fcfg[F_EPS], step_size, bc2s)
    write_m = opt != 0 or mu != 0
    write_v = opt == 1
    keep_m, keep_v = not write_m, not write_v
    ok = True
    for j in range(P):     # no early exit: the check runs at the speed of the update
        pj, mj, vj = _updated(opt, j, flat, grad, m, v, k)
        ok &= math.isfinite(pj) & (math.isfinite(mj) | keep_m) & (math.isfinite(vj) | keep_v)
    if not ok:
        res[R_SKIPPED] = 1
        res[R_CLIPPED] = 0
        return
    for j in range(P):
        pj, mj, vj = _updated(opt, j, flat, grad, m, v, k)
        flat[j] = pj
        if write_m:
            m[j] = mj
        if write_v:
            v[j] = vj


@njit(cache=True)
def train_step_kernel(cfg, fcfg, flat, grad, opt_state, batch, ws, state_n,
                      res):
    """One fused training step: forward over time, loss, BPTT, clipping and
    the optimizer update. batch = (x, tok, lengths, state0, yi, yf).
    res receives loss, grad norm (before clipping), clipped, skipped."""
    res[R_LOSS] = grad_kernel(cfg, fcfg, flat, grad, batch, ws, state_n)
    clip_update_kernel(cfg, fcfg, flat, grad, opt_state, res)


@njit(cache=True)
def flow_kernel(cfg, flat, grad, batch, ws, state_n, flow):
    """Forward, loss and BPTT; flow (T,) receives the norm of dL/dh_t of the
    top layer per step."""
    return _loss_grad(cfg, flat, grad, batch, ws, state_n, flow, 0.0)


# ============================================================================
# Python entry points (the same functions as backends/reference.py)
# ============================================================================
_OPTS = {"sgd": 0, "adam": 1, "adagrad": 2}
_CLIPS = {None: 0, "norm": 1, "value": 2}
_MODES = {"tanh": 0, "relu": 1, "sigmoid": 2, "lstm": 3, "gru": 4}
_CELLS = {"lstm": 1, "gru": 2}      # the workspace's cell code (_sections)


class _Ctx:
    """Per-caller state kept between calls: the workspace and the cfg array
    for the last shape, so a steady training loop allocates nothing."""
    __slots__ = ("key", "cfg", "ws", "grad", "state_n", "res", "fcfg",
                 "serial")

    def __init__(self):
        self.key = None


def _ctx(ctx):
    return ctx_state(ctx, "numba", _Ctx)


def chunk_rows(B):
    """Rows per chunk of the batch's fixed partition for the recurrences:
    at most SPLIT chunks, each a multiple of 4 rows from B = 4 on (the
    register blocks of _addmm_nt), one row each below. It depends on B only,
    never on the thread count, so results do not either."""
    if B < 4:
        return 1
    rc = -(-B // SPLIT)
    return -(-rc // 4) * 4


def _mkl_config(cfg, spec, dtype, flags, rc):
    """Fill cfg's MKL slots for this shape with the MK_* flags chosen for
    it (chunks of at most rc rows); returns the elements of one chunk's
    packing slot (0: no packing)."""
    cfg[C_MKL:C_MKL + 6] = 0
    cfg[C_MKL] = flags & (MK_FUSED | MK_TILE)
    if flags & MK_TILE:
        H, GH = spec.H, spec.G * spec.H
        isz = np.dtype(dtype).itemsize
        packn = GEMM_NR * max(-(-GH // GEMM_NR) * H,     # W_hh, forward
                              -(-H // GEMM_NR) * GH)     # W_hh.T, backward
        packn += 64 // isz                 # room to align the slot
        cfg[C_MKL_PACKN] = packn
        return packn
    if _GEMM != "mkl" or flags & MK_MKL == 0:
        return 0
    t = np.dtype(dtype).char
    cfg[C_MKL] = flags
    cfg[C_MKL_GEMM] = _MKL.gemm[t]
    cfg[C_MKL_PACK] = _MKL.pack[t]
    cfg[C_MKL_COMP] = _MKL.compute[t]
    cfg[C_MKL_LOCAL] = _MKL.set_threads_local
    if not flags & MK_PACKED:
        return 0
    H, GH = spec.H, spec.G * spec.H
    m = rc                                 # the largest chunk
    nbytes = max(_MKL.pack_size(t, _B_MATRIX, m, GH, H),     # W_hh.T, forward
                 _MKL.pack_size(t, _B_MATRIX, m, H, GH))     # W_hh, backward
    isz = np.dtype(dtype).itemsize
    packn = -(-nbytes // isz) + 64 // isz  # + room to align the slot
    cfg[C_MKL_PACKN] = packn
    return packn


def _make_cfg(spec, dtype, T, B, tok, flags):
    """cfg for this shape with the MK_* flags `flags`, and the workspace
    size (elements)."""
    from .._spec import out_offsets, param_offsets
    poff = param_offsets(spec)
    cfg = np.zeros(C_POFF + poff.size, dtype=np.int64)
    cfg[C_T], cfg[C_B], cfg[C_I], cfg[C_H] = T, B, spec.I, spec.H
    cfg[C_L], cfg[C_D], cfg[C_MODE] = spec.L, spec.D, _MODES[spec.mode]
    cfg[C_BIAS], cfg[C_TOK], cfg[C_O] = int(spec.bias), int(tok), spec.O
    cfg[C_READOUT] = 1 if spec.readout == "last" else 0
    cfg[C_LOSS] = 1 if spec.loss == "mse" else 0
    cfg[C_FAST] = int(np.dtype(dtype) == np.float32)
    # Work split over the cores: batch rows for the recurrences, in the
    # fixed partition of chunk_rows (rows are independent); rows of the
    # result for the one-off products (any split gives the same bits), over
    # at most SPLIT of numba's threads.
    rc = chunk_rows(B)
    cfg[C_RC] = rc
    cfg[C_NC] = -(-B // rc)
    cfg[C_NCG] = max(1, min(numba.get_num_threads(), SPLIT))
    cfg[C_PAR] = PAR_MACS
    cfg[C_WOUT], cfg[C_BOUT] = out_offsets(spec)
    cfg[C_POFF:] = poff.ravel()
    _mkl_config(cfg, spec, dtype, flags, rc)
    n = workspace_size(T, B, spec.I, spec.H, spec.L, spec.D, spec.G, spec.O,
                       _CELLS.get(spec.mode, 0), int(tok),
                       _pack_elems.py_func(cfg))
    return cfg, n


def _prepare(c, spec, flat, T, B, tok):
    if _MKL_REQUIRED and _MKL is None:
        raise RuntimeError("FASTRNN_MKL=1 asks for MKL in the numba backend, "
                           f"but it is not usable: {_MKL_WHY}")
    if _MKL_ENV_BAD:
        raise ValueError("FASTRNN_MKL: expected 0, 1 or auto (unset), got "
                         f"{os.environ.get('FASTRNN_MKL')!r}")
    key = (spec, T, B, tok, flat.dtype, numba.get_num_threads(), PAR_MACS,
           _GEMM, MKL_PACKED, MKL_FORCE, WS_ALIGN, _plan.enabled())
    if c.key == key:
        return
    flags, c.serial = choose(spec, flat.dtype, B, tok, T)
    c.cfg, n = _make_cfg(spec, flat.dtype, T, B, tok, flags)
    c.ws = _aligned_zeros(n, flat.dtype, WS_ALIGN)
    c.grad = np.zeros_like(flat)
    c.state_n = np.zeros((2 if spec.mode == "lstm" else 1, spec.L * spec.D,
                          B, spec.H), dtype=flat.dtype)
    c.res = np.zeros(4, dtype=np.float64)
    c.fcfg = np.zeros(8, dtype=np.float64)
    c.key = key


class _Threads:
    """Runs a kernel call on one of numba's threads when the plan chose
    that (numba.set_num_threads is per calling thread: other threads and
    the results are unaffected), else changes nothing."""

    def __init__(self, serial):
        self.serial = serial

    def __enter__(self):
        if self.serial:
            self.prev = numba.get_num_threads()
            numba.set_num_threads(1)

    def __exit__(self, *exc):
        if self.serial:
            numba.set_num_threads(self.prev)
        return False


# ============================================================================
# the measured plan (backends/_plan.py)
# ============================================================================
PLAN_T = 8             # time steps of the first, short synthetic step
PLAN_STEP_S = 0.04     # longer steps (up to the shape's T) while this fast
PLAN_BUDGET_S = 0.8    # planning one shape stops measuring after this long
# another strategy replaces the default (loops, all threads) only when it
# measured at least this much faster (timing noise must not flip choices)
PLAN_MARGIN = 0.97


def _num_threads():
    """numba's thread count for this thread (what the plan is chosen for)."""
    return numba.get_num_threads()


def t_class(T):
    """T rounded up to a power of 2: the plan's classes of sequence length
    (T sets the size of the one-off products, so whether splitting them
    over cores pays)."""
    return 1 << max(0, int(T) - 1).bit_length()


def shape_class(spec, dtype, B, tok, T):
    """The plan's key of a shape (the read-out only scales the work; nr:
    the tiled kernel's width, so that entries planned before MK_TILE
    existed, or for another width, are measured again)."""
    cell = spec.mode if spec.mode in ("lstm", "gru") else "rnn"
    return (f"{cell}/{np.dtype(dtype).name}/B={B}/H={spec.H}/I={spec.I}/"
            f"L={spec.L}/D={spec.D}/T~{t_class(T)}/{'tok' if tok else 'x'}/"
            f"gemm={_GEMM}/nr={GEMM_NR}")


def plan_candidates():
    """The MK_* flags the plan chooses among: the loops (0), the fused LSTM
    forward (MK_FUSED, LSTM only), and with the engine "mkl" MKL for the
    forward, the backward or both per-step products (the backward also
    with the fused forward), and the register-tiled kernel of packed
    panels for both per-step products (MK_TILE)."""
    if _GEMM != "mkl":
        return [0, MK_FUSED, MK_TILE]
    return [0, MK_FUSED, MK_TILE, MK_FWD, MK_BWD, MK_FWD | MK_BWD, MK_FUSED | MK_BWD]


def _plan_version():
    return _MKL.describe() if _MKL is not None else ""


def choose(spec, dtype, B, tok, T):
    """(MK_* flags, serial) for this shape: MKL_FORCE; the fixed default
    (loops, all threads) when FASTRNN_PLAN=off or there is nothing to
    choose; else the plan, measured now if this shape class is new."""
    if MKL_FORCE is not None:
        return MKL_FORCE, False
    mks = [m for m in plan_candidates()
           if spec.mode == "lstm" or not m & MK_FUSED]
    nth = _num_threads()
    if not _plan.enabled() or (len(mks) == 1 and nth == 1):
        return 0, False
    plan = _plan.get_plan(_plan_version())
    key = shape_class(spec, dtype, B, tok, T)
    e = plan.get(key)
    ok = (e is not None and e.get("mkl") in mks
          and isinstance(e.get("serial"), dict)
          and isinstance(e["serial"].get(str(nth)), bool))
    if not ok:
        e = measure(spec, dtype, B, tok, mks, nth,
                    e if e is not None and e.get("mkl") in mks else None,
                    T=t_class(T))
        plan.put(key, e)
    return int(e["mkl"]), bool(e["serial"][str(nth)])


def tune(cells, batches, hiddens, I=32, dtype="float32", replan=False, T=100):
    """Plan (and compile for) each (cell, B, H) of the grid now; returns one
    row per shape: the choice and the synthetic step's time."""
    from .._spec import make_spec
    dtype = np.dtype(dtype)
    nth = _num_threads()
    plan = _plan.get_plan(_plan_version()) if _plan.enabled() else None
    rows = []
    for cell in cells:
        for B in batches:
            for H in hiddens:
                spec = make_spec(cell if cell in ("lstm", "gru") else "tanh",
                                 I, H, O=10)
                if replan and plan is not None:
                    key = shape_class(spec, dtype, B, False, T)
                    if plan.get(key) is not None:
                        plan.entries.pop(key, None)
                mk, serial = choose(spec, dtype, B, False, T)
                names = [n for f, n in ((MK_FWD, "fwd"), (MK_BWD, "bwd"))
                         if mk & f]
                prod = ("mkl " + "+".join(names)) if names else (
                    "tiled" if mk & MK_TILE else "loops")
                if mk & MK_FUSED:
                    prod = "fused" + (" " + prod if names else "")
                rows.append(dict(
                    cell=cell, B=B, H=H, mkl=mk, products=prod,
                    threads="1" if serial else str(nth),
                    ms=1e3 * time_strategy(spec, dtype, B, False, mk, serial)))
    return rows


def _synthetic(spec, dtype, T, B, tok):
    """A training step's arguments for timing (SGD with lr 0: the
    parameters do not move)."""
    from .._spec import n_params
    sp = spec.with_readout(max(spec.O, 1), "cross_entropy", "all")
    rng = np.random.default_rng(0)
    P = n_params(sp)
    flat = (0.1 * rng.standard_normal(P)).astype(dtype)
    if tok:
        x = np.empty((0, 1), dtype=dtype)
        ids = rng.integers(0, sp.I, T * B).astype(np.int64)
    else:
        x = rng.standard_normal((T * B, sp.I)).astype(dtype)
        ids = np.empty(0, np.int64)
    S = 2 if sp.mode == "lstm" else 1
    state0 = np.zeros((S, sp.L * sp.D, B, sp.H), dtype=dtype)
    batch = (x, ids, np.full(B, T, np.int64), state0,
             np.zeros(T * B, np.int64), np.zeros((1, sp.O), dtype=dtype))
    return sp, flat, batch


def time_strategy(spec, dtype, B, tok, flags, serial, T=PLAN_T, reps=3,
                  budget=None):
    """Best time (s) of a synthetic training step of T steps with these
    MK_* flags, on one thread if `serial`."""
    import time
    sp, flat, batch = _synthetic(spec, dtype, T, B, tok)
    cfg, n = _make_cfg(sp, dtype, T, B, tok, flags)
    ws = _aligned_zeros(n, dtype, WS_ALIGN)
    grad = np.zeros_like(flat)
    opt = np.zeros((2, flat.size), dtype=dtype)
    state_n = np.zeros_like(batch[3])
    res = np.zeros(4, dtype=np.float64)
    fcfg = np.zeros(8, dtype=np.float64)
    best = math.inf
    t_end = None if budget is None else time.perf_counter() + budget
    with _Threads(serial):
        train_step_kernel(cfg, fcfg, flat, grad, opt, batch, ws, state_n, res)
        for _ in range(reps):
            t = time.perf_counter()
            train_step_kernel(cfg, fcfg, flat, grad, opt, batch, ws, state_n,
                              res)
            best = min(best, time.perf_counter() - t)
            if t_end is not None and time.perf_counter() > t_end:
                break
    return best


def measure(spec, dtype, B, tok, mks, nth, known=None, T=PLAN_T):
    """Time the candidates of one shape class: the MK_* flags (unless
    `known` has them) on all threads, then serial or not with that choice;
    within PLAN_BUDGET_S (after a first call that compiles the kernels if
    needed), on synthetic steps of up to T steps (as long as one stays
    under PLAN_STEP_S). Returns the plan entry."""
    import time
    time_strategy(spec, dtype, B, tok, 0, False, T=1, reps=0)
    t0 = time.perf_counter()
    short = time_strategy(spec, dtype, B, tok, 0, False, T=PLAN_T, reps=1)
    Tp = int(min(max(T, 1), max(PLAN_T, PLAN_T * PLAN_STEP_S / max(short, 1e-9))))
    times = {}
    if known is not None:
        best_mk = known["mkl"]
        entry = dict(known, serial=dict(known.get("serial") or {}))
    else:
        for mk in mks:
            left = PLAN_BUDGET_S - (time.perf_counter() - t0)
            if times and left <= 0:
                break
            times[mk] = time_strategy(spec, dtype, B, tok, mk, False, T=Tp,
                                      budget=left / max(1, len(mks) - len(times)))
        best_mk = min(times, key=times.get)
        if times[best_mk] > PLAN_MARGIN * times[0]:
            best_mk = 0
        entry = {"mkl": best_mk, "serial": {}, "T": Tp,
                 "ms": {str(k): round(v * 1e3, 4) for k, v in times.items()}}
    serial = False
    if nth > 1 and time.perf_counter() - t0 < PLAN_BUDGET_S:
        par = times.get(best_mk) or time_strategy(spec, dtype, B, tok, best_mk,
                                                  False, T=Tp)
        one = time_strategy(spec, dtype, B, tok, best_mk, True, T=Tp)
        serial = one < PLAN_MARGIN * par
    entry["serial"][str(nth)] = serial
    return entry


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
    with _Threads(c.serial):
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
    with _Threads(c.serial):
        core_backward_kernel(cfg, flat, x2, tok, lengths, c.ws, dout, dstate_n,
                             grad, dx, dstate0, flow,
                             0.0 if state_clip is None else float(state_clip),
                             dcs)
    dx = None if tok.shape[0] else dx.reshape(T, B, spec.I)
    return dx, dstate0, grad, flow


def model_forward(spec, flat, x, lengths, state0, ctx=None):
    c, T, B, x2, tok, lengths, state_n = _begin(spec, flat, x, lengths, ctx)
    with _Threads(c.serial):
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
    with _Threads(c.serial):
        train_step_kernel(cfg, f, flat, c.grad, opt_state,
                          (x2, tok, lengths, state0, yi, yf), c.ws, state_n,
                          c.res)
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
    with _Threads(c.serial):
        flow_kernel(cfg, flat, c.grad, (x2, tok, lengths, state0, yi, yf),
                    c.ws, state_n, flow)
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
    flow = np.empty(cfg[C_T], dtype=np.float64)
    return _loss_grad(cfg, flat, grad, batch, ws, state_n, flow, fcfg[F_SCLIP])


@njit(cache=True)
def _loss_grad(cfg, flat, grad, batch, ws, state_n, flow, sclip):
    """Forward over time, read-out, loss and BPTT into grad (flow (T,): the
    norm of dL/dh_t of the top layer per step); returns the loss."""
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
    # no input gradient (x[:0]) and no outside dL/dc_t (dtop[:0])
    core_backward_kernel(cfg, flat, x, tok, lengths, ws, dtop, dstate, grad,
                         x[:0], dstate, flow, sclip, dtop[:0])
    return loss


def train_grad(spec, flat, x, lengths, state0, y, *, state_clip, ctx=None):
    c, T, B, x2, tok, lengths, state_n = _begin(spec, flat, x, lengths, ctx)
    cfg, f = c.cfg, c.fcfg
    cfg[C_SCLIP] = int(state_clip is not None)
    f[F_SCLIP] = 0.0 if state_clip is None else state_clip
    yi, yf = _targets(spec, y, flat.dtype)
    with _Threads(c.serial):
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
