"""CUDA backend: the whole training step as numba.cuda kernels.

Needs the ``numba-cuda`` package (``pip install -e ".[cuda]"``) and an NVIDIA
GPU, or numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``: the kernels run
as Python threads, which is how the tests run without a GPU; docs/cuda.md).

Work per training step (the same functions as backends/reference.py):
- input projection W_ih x for all T*B rows of a layer, both directions at
  once: one batched tiled matmul (``_mm_kernel``); for token ids the
  recurrence gathers the columns of W_ih instead (no projection at all);
- the recurrence (forward, then BPTT) on one of two paths, below;
- weight gradients dW_hh = sum_t delta_t h_{t-1}^T and dW_ih = sum_t delta_t
  x_t^T: one batched matmul each over all stored deltas; bias gradients (and
  the token-id gradient of W_ih) a column sum; the input gradient of a layer
  one matmul per direction;
- read-out, loss and its gradient; the global gradient norm (a two-level
  float64 reduction), the non-finite guard, ClipNorm/ClipValue and the
  optimizer update, all on the device: the update kernel itself reads
  whether the step is skipped and how much to scale. What comes back per
  step is five numbers (loss, norm, clipped, skipped, scale), the final
  state, and the parameters (see below).

Recurrence paths (``choose_path``; ``PATH``/``FASTRNN_CUDA_PATH`` forces one):
- "persistent": one launch per layer for the whole sequence. One thread block
  per (batch row, direction) loops over all T steps with one block-level
  barrier per step; the recurrent state (h, c; in BPTT the deltas of the
  previous step and dh, dc) lives in shared memory. W_hh is held in shared
  memory when it fits (G*H*H + 2*G*H + 3*H elements within
  ``PERSIST_SMEM_BYTES``, 48 KiB: float32 RNN H <= 108, LSTM H <= 54;
  float64 RNN H <= 75, LSTM H <= 37); otherwise each block reads it from
  global memory (it stays in L2), which is still one launch, used while
  W_hh is at most ``PERSIST_MAX_W_BYTES`` (2 MiB: float32 RNN H <= 724,
  LSTM H <= 362) and B <= ``PERSIST_MAX_B`` (16).
  Blocks never wait for each other (batch rows and directions are
  independent), so there is no grid-wide synchronisation anywhere and the
  path runs unchanged in the simulator, which executes blocks one after
  another.
- "step": everything larger. One launch per time step (both directions in
  the same launch): a tile of ``STEP_NU`` hidden units x ``STEP_RB`` batch
  rows per block, the previous h (in BPTT: the previous deltas) staged in
  shared memory in chunks of ``STEP_KT``, all G gates of a unit in the same
  thread so the cell update is fused into the same kernel.

Parameters and host memory: the callers own flat host arrays (the model's
parameters, the optimizer moments), and to the user those are the parameters.
``train_step`` keeps the newest copy on the device between steps: it uploads
the host arrays only when the device copy is not current (first step, after
a host-side write such as load_state_dict, after another TrainStep changed
them), and after a step it registers itself with fastrnn/_mirror.py as the
holder of newer parameters instead of copying them back. Any host-side access
(state_dict, parameters(), save, forward, another backend call) first makes
the holder copy them back (``_Ctx.pull``). What comes back per step is five
numbers (loss, norm, clipped, skipped, scale) and the final state. While the
user holds views from ``parameters()`` (they may be read or written at any
moment) the step falls back to mirroring: upload before, copy back after.
Device buffers (parameters, gradient, moments, workspace) live in the
``ctx`` dict the caller passes and are reused while the shape is the same.
Inputs (x, lengths, hx, targets) may be NumPy arrays or CUDA device arrays
(numba or anything with ``__cuda_array_interface__``).

Kernels compile on first use (cached on disk); precompile() compiles all of
them for the argument types of kernel_signatures() ahead of time.

The GRU (gates r, z, n) keeps W_hn h_{t-1} + b_hn apart, as PyTorch does
(r multiplies it): its forward stores (r, z, n, W_hn h_{t-1} + b_hn) in GA,
and its BPTT has two sets of deltas, the input side in DELTA (for dW_ih,
db_ih and the input gradient) and the recurrent side in DELTAH (for dW_hh,
db_hh and dL/dh_{t-1} = dh z + DELTAH W_hh).

Shapes on the device (S = 1 for the RNN and GRU, 2 for the LSTM; G gate blocks):
  P, G: (n_params,) flat parameters / gradient; M: (2, n_params) moments
  SH:   (L, S, D, T+2, B, H) states; h_t at [.., t+1, ..], h0 at index 0
        (forward direction) or T+1 (reverse direction)
  GA:   (L, D, T, B, 4H) LSTM gate activations (i, f, g, o); GRU (r, z, n,
        W_hn h_{t-1} + b_hn)
  LOUT: (L, T*B, D*H) layer outputs (zero at padding steps)
  XP:   (D, T*B, G*H) input projection of the current layer (no bias)
  WT:   (D*H*G*H,) W_hh transposed, [d][k][j] (coalesced forward reads)
  DELTA:(D, T*B, G*H) dL/da_t of the current layer, zero at padding
  DELTAH: GRU only, (D, T*B, 3H): the recurrent side's deltas
"""
import contextlib
import importlib.util
import math
import os
import sys
import warnings
import weakref

import numpy as np

from .. import _mirror
from .._spec import out_offsets, param_offsets
from .._validate import DeviceSeq
from . import ctx_state

name = "cuda"
# the layers hand device arrays over in place (as _validate.DeviceSeq)
DEVICE_INPUTS = True

try:
    _HAVE_NUMBA_CUDA = importlib.util.find_spec("numba_cuda") is not None
except (ImportError, ValueError):
    _HAVE_NUMBA_CUDA = False
# without numba-cuda (or when it cannot be imported) the module still
# imports: available() says why the backend cannot run
cuda, SIM, _IMPORT_ERROR = None, False, None
if _HAVE_NUMBA_CUDA:
    try:
        from numba import cuda
        from numba.core import config as _nb_config
        SIM = bool(_nb_config.ENABLE_CUDASIM)
    except Exception as e:  # e.g. a numba-cuda built for another numba
        cuda, _IMPORT_ERROR = None, e

LSTM = 3
GRU = 4
_MODES = {"tanh": 0, "relu": 1, "sigmoid": 2, "lstm": 3, "gru": 4}
_OPTS = {"sgd": 0, "adam": 1, "adagrad": 2}
_CLIPS = {None: 0, "norm": 1, "value": 2}

# ---- launch shapes ----------------------------------------------------------
# On a GPU these are compile-time constants of the kernels (edit them here).
# In the simulator they are small, so that tiny test inputs still span several
# blocks, and configure() may change them at run time (the simulator reads
# them on every launch).
_GPU_SHAPES = dict(TPB=256, MAX_BLOCKS=2048, NRED=128,
                   MM_BM=64, MM_BN=64, MM_BK=16, MM_TM=4, MM_TN=4,
                   STEP_NU=64, STEP_RB=4, STEP_KT=32, PERSIST_NT=0)
_SIM_SHAPES = dict(TPB=8, MAX_BLOCKS=2, NRED=2,
                   MM_BM=16, MM_BN=16, MM_BK=16, MM_TM=8, MM_TN=8,
                   STEP_NU=4, STEP_RB=2, STEP_KT=4, PERSIST_NT=4)
TPB = MAX_BLOCKS = NRED = MM_BM = MM_BN = MM_BK = MM_TM = MM_TN = 0
MM_NX = MM_NY = MM_BMP = MM_BNP = STEP_NU = STEP_RB = STEP_KT = STEP_ACC = 0
PERSIST_NT = 0


def _set_shapes(shapes):
    g = globals()
    g.update(shapes)
    # derived constants (kernels need them as plain globals)
    g["MM_NX"] = g["MM_BN"] // g["MM_TN"]   # threads along n
    g["MM_NY"] = g["MM_BM"] // g["MM_TM"]   # threads along m
    g["MM_BMP"] = g["MM_BM"] + 1            # padded shared tiles (no bank conflicts)
    g["MM_BNP"] = g["MM_BN"] + 1
    g["STEP_ACC"] = 4 * g["STEP_RB"]        # accumulators: G <= 4 gates x rows


_set_shapes(_SIM_SHAPES if SIM else _GPU_SHAPES)

# ---- path choice (host-side, may be changed at any time) --------------------
PATH = os.environ.get("FASTRNN_CUDA_PATH", "auto")   # "auto" | "persistent" | "step"
PERSIST_SMEM_BYTES = 48 * 1024       # W_hh in shared memory up to this
PERSIST_MAX_W_BYTES = 2 * 1024 ** 2  # persistent with W_hh from global/L2 up to this
PERSIST_MAX_B = 16


def configure(**kw):
    """Change launch shapes (simulator only: on a GPU they are compiled in)
    or path settings (PATH, PERSIST_*). Returns the previous values, so a test
    can restore them: ``old = configure(TPB=4); ...; configure(**old)``."""
    shape_keys = set(_GPU_SHAPES)
    path_keys = {"PATH", "PERSIST_SMEM_BYTES", "PERSIST_MAX_W_BYTES", "PERSIST_MAX_B"}
    unknown = set(kw) - shape_keys - path_keys
    if unknown:
        raise ValueError(f"configure: unknown setting(s) {sorted(unknown)}")
    if set(kw) & shape_keys and not SIM:
        raise RuntimeError("configure: launch shapes are compile-time constants on a "
                           "GPU; edit _GPU_SHAPES in fastrnn/backends/cuda.py")
    if "PATH" in kw and kw["PATH"] not in ("auto", "persistent", "step"):
        raise ValueError(f"PATH: expected 'auto', 'persistent' or 'step', got {kw['PATH']!r}")
    g = globals()
    old = {k: g[k] for k in kw}
    shapes = {k: g[k] for k in shape_keys}
    shapes.update({k: v for k, v in kw.items() if k in shape_keys})
    if shapes["MM_BM"] % shapes["MM_TM"] or shapes["MM_BN"] % shapes["MM_TN"]:
        raise ValueError("configure: MM_BM/MM_BN must be multiples of MM_TM/MM_TN")
    _set_shapes(shapes)
    g.update({k: v for k, v in kw.items() if k in path_keys})
    return old


def available():
    if not _HAVE_NUMBA_CUDA:
        return False, "numba-cuda is not installed (pip install fastrnn[cuda])"
    if _IMPORT_ERROR is not None:
        return False, (f"numba-cuda cannot be imported: "
                       f"{type(_IMPORT_ERROR).__name__}: {_IMPORT_ERROR}")
    import importlib.metadata
    ver = importlib.metadata.version("numba-cuda")
    if SIM:
        return True, f"CUDA simulator (NUMBA_ENABLE_CUDASIM=1), numba-cuda {ver}"
    try:
        dev = cuda.get_current_device()
        gpu = dev.name.decode() if isinstance(dev.name, bytes) else str(dev.name)
        cc = ".".join(map(str, dev.compute_capability))
    except Exception as e:  # no driver, no device, broken install
        msg = " ".join(str(e).split()).replace(": .", ".").strip(" :")
        return False, f"no CUDA GPU found: {msg or type(e).__name__}"
    if tuple(dev.compute_capability) < (6, 0):   # float64 atomics (gradient_flow)
        return False, f"{gpu}: compute capability {cc} < 6.0 is not supported"
    return True, f"{gpu} (compute capability {cc}), numba-cuda {ver}"


def device_name():
    """The GPU's name ("simulator" under NUMBA_ENABLE_CUDASIM)."""
    if SIM:
        return "simulator"
    dev = cuda.get_current_device()
    return dev.name.decode() if isinstance(dev.name, bytes) else str(dev.name)


# ---- kernel decorators (no-ops without numba-cuda: nothing is ever launched) --
def _kernel(fn):
    if cuda is None:
        return fn
    return cuda.jit(cache=not SIM)(fn)


def _device(fn):
    # In the simulator a device function may stay a plain Python function (it
    # is only ever called from inside a kernel, which already runs with the
    # simulated cuda module): that skips a context switch per call.
    if cuda is None or SIM:
        return fn
    return cuda.jit(device=True)(fn)


# ============================================================================
# device functions: activations, cell forward/backward
# ============================================================================
@_device
def _sigmoid(a):
    # never overflows: exp of a non-positive number
    if a >= 0:
        return 1.0 / (1.0 + math.exp(-a))
    e = math.exp(a)
    return e / (1.0 + e)


@_device
def _act(mode, a):
    """f(a) for tanh (0), relu (1), sigmoid (2); NaN propagates."""
    if mode == 0:
        return math.tanh(a)
    if mode == 1:
        return 0.0 if a < 0 else a * 1.0
    return _sigmoid(a)


@_device
def _dact(mode, h):
    """f'(a) through h = f(a)."""
    if mode == 0:
        return 1.0 - h * h
    if mode == 1:
        return 1.0 if h > 0 else 0.0
    return h * (1.0 - h)


@_device
def _lstm_cell(ai, af, ag, ao, c_prev):
    """Gates (i, f, g, o) from pre-activations; c = f c_prev + i g,
    h = o tanh(c). Returns h, c, i, f, g, o."""
    i = _sigmoid(ai)
    f = _sigmoid(af)
    g = math.tanh(ag)
    o = _sigmoid(ao)
    c = f * c_prev + i * g
    return o * math.tanh(c), c, i, f, g, o


@_device
def _lstm_cell_backward(dh, dc, i, f, g, o, c, c_prev):
    """Returns dL/da for the four gates and dL/dc_{t-1}."""
    tc = math.tanh(c)
    dct = dc + dh * o * (1.0 - tc * tc)
    return (dct * g * i * (1.0 - i), dct * c_prev * f * (1.0 - f),
            dct * i * (1.0 - g * g), dh * tc * o * (1.0 - o), dct * f)


@_device
def _gru_cell(xr, xz, xn, hr, hz, hn, h_prev):
    """x*: input side W_ih x + b_ih, h*: recurrent side W_hh h + b_hh of the
    gates (r, z, n). Returns h, r, z, n."""
    r = _sigmoid(xr + hr)
    z = _sigmoid(xz + hz)
    n = math.tanh(xn + r * hn)
    return (1.0 - z) * n + z * h_prev, r, z, n


@_device
def _gru_cell_backward(dh, r, z, n, hn, h_prev):
    """dL/d(pre-activations) of r, z, n on the input side; the recurrent
    side is (dr, dz, r dn); and the direct part dh z of dL/dh_{t-1}."""
    dn = dh * (1.0 - z) * (1.0 - n * n)
    dz = dh * (h_prev - n) * z * (1.0 - z)
    dr = dn * hn * r * (1.0 - r)
    return dr, dz, dn, dh * z


@_device
def _proj(P, poff, XP, tok, dims, d, t, b, j):
    """(W_ih x_t)_j for batch row b: the projection, or for token ids a
    column gather of W_ih. dims: the forward kernels'."""
    B, Ik, D, k, tokin = dims[1], dims[3], dims[4], dims[6], dims[7]
    kd = k * D + d
    if tokin:
        return P[poff[kd, 0] + j * Ik + tok[t * B + b]]
    return XP[d, t * B + b, j]


@_device
def _input_term(P, poff, XP, tok, dims, d, t, b, j):
    """(W_ih x_t)_j + b_ih[j] + b_hh[j] for batch row b."""
    D, k, bias = dims[4], dims[6], dims[8]
    kd = k * D + d
    v = _proj(P, poff, XP, tok, dims, d, t, b, j)
    if bias:
        return v + P[poff[kd, 2] + j] + P[poff[kd, 3] + j]
    return v


@_device
def _unit_forward(dims, P, poff, XP, tok, GA, rec, c_prev, d, t, b, u):
    """Hidden unit u of batch row b at step t, from rec = its recurrent sums
    (W_hh h_{t-1}) of the G gate rows u, H+u, 2H+u, 3H+u: adds the input
    term and applies the cell; the LSTM's gate activations go to GA.
    Returns (h_t, c_t) (c_t = c_prev for the RNN). For the GRU c_prev is
    h_{t-1}, and GA gets (r, z, n, W_hn h_{t-1} + b_hn)."""
    H, mode = dims[2], dims[5]
    if mode == GRU:
        D, k, bias = dims[4], dims[6], dims[8]
        kd = k * D + d
        xn = _proj(P, poff, XP, tok, dims, d, t, b, 2 * H + u)
        hn = rec[2]
        if bias:
            xn = xn + P[poff[kd, 2] + 2 * H + u]
            hn = hn + P[poff[kd, 3] + 2 * H + u]
        h, gr, gz, gn = _gru_cell(
            _input_term(P, poff, XP, tok, dims, d, t, b, u),
            _input_term(P, poff, XP, tok, dims, d, t, b, H + u),
            xn, rec[0], rec[1], hn, c_prev)
        GA[d, t, b, u] = gr
        GA[d, t, b, H + u] = gz
        GA[d, t, b, 2 * H + u] = gn
        GA[d, t, b, 3 * H + u] = hn
        return h, c_prev
    if mode == LSTM:
        h, c, gi, gf, gg, go = _lstm_cell(
            rec[0] + _input_term(P, poff, XP, tok, dims, d, t, b, u),
            rec[1] + _input_term(P, poff, XP, tok, dims, d, t, b, H + u),
            rec[2] + _input_term(P, poff, XP, tok, dims, d, t, b, 2 * H + u),
            rec[3] + _input_term(P, poff, XP, tok, dims, d, t, b, 3 * H + u),
            c_prev)
        GA[d, t, b, u] = gi
        GA[d, t, b, H + u] = gf
        GA[d, t, b, 2 * H + u] = gg
        GA[d, t, b, 3 * H + u] = go
        return h, c
    return _act(mode, rec[0] + _input_term(P, poff, XP, tok, dims, d, t, b, u)), c_prev * 1.0


@_device
def _dot(W, w0, ws, v, v0, n):
    """sum_k W[w0 + k*ws] * v[v0 + k] for k < n (n >= 1), in W's dtype."""
    acc = W[w0] * v[v0]
    for kk in range(1, n):
        acc += W[w0 + kk * ws] * v[v0 + kk]
    return acc


@_device
def _dot3(W, w0, ws, gs, v, v0, n):
    """_dot for three gate rows at once (offsets 0, gs, 2gs from w0)."""
    hk = v[v0]
    a0 = W[w0] * hk
    a1 = W[w0 + gs] * hk
    a2 = W[w0 + 2 * gs] * hk
    for kk in range(1, n):
        hk = v[v0 + kk]
        wr = w0 + kk * ws
        a0 += W[wr] * hk
        a1 += W[wr + gs] * hk
        a2 += W[wr + 2 * gs] * hk
    return a0, a1, a2


@_device
def _dot4(W, w0, ws, gs, v, v0, n):
    """_dot for four gate rows at once (offsets 0, gs, 2gs, 3gs from w0)."""
    hk = v[v0]
    a0 = W[w0] * hk
    a1 = W[w0 + gs] * hk
    a2 = W[w0 + 2 * gs] * hk
    a3 = W[w0 + 3 * gs] * hk
    for kk in range(1, n):
        hk = v[v0 + kk]
        wr = w0 + kk * ws
        a0 += W[wr] * hk
        a1 += W[wr + gs] * hk
        a2 += W[wr + 2 * gs] * hk
        a3 += W[wr + 3 * gs] * hk
    return a0, a1, a2, a3


# ============================================================================
# generic kernels: tiled matmul, transpose, sums
# ============================================================================
@_kernel
def _mm_kernel(a, b, c, dims):
    """C = A @ B (C += A @ B when dims[8]), batched over blockIdx.z.

    A (M, K): element (m, k) at a[z*sa + m*as0 + k*as1]; B (K, N) likewise
    with (bs0, bs1, sb); C (M, N) row-major with row stride cs0 at c[z*sc].
    dims = (M, N, K, as0, as1, bs0, bs1, cs0, accumulate, sa, sb, sc).
    Block tile MM_BM x MM_BN, k-chunks of MM_BK in shared memory, each of the
    MM_NX x MM_NY threads computes MM_TM x MM_TN outputs in registers."""
    M = dims[0]
    N = dims[1]
    K = dims[2]
    as0 = dims[3]
    as1 = dims[4]
    bs0 = dims[5]
    bs1 = dims[6]
    cs0 = dims[7]
    z = cuda.blockIdx.z
    ao = z * dims[9]
    bo = z * dims[10]
    co = z * dims[11]
    sm = cuda.shared.array(0, a.dtype)     # dynamic: MM_BK * (MM_BMP + MM_BNP)
    As = sm[0:MM_BK * MM_BMP]               # As[kk*MM_BMP + mm] = A[m0+mm, k0+kk]
    Bs = sm[MM_BK * MM_BMP:MM_BK * (MM_BMP + MM_BNP)]
    acc = cuda.local.array((MM_TM, MM_TN), a.dtype)
    ar = cuda.local.array(MM_TM, a.dtype)
    br = cuda.local.array(MM_TN, a.dtype)
    tx = cuda.threadIdx.x
    ty = cuda.threadIdx.y
    tid = ty * MM_NX + tx
    nthr = MM_NX * MM_NY
    m0 = cuda.blockIdx.y * MM_BM
    n0 = cuda.blockIdx.x * MM_BN
    for i in range(MM_TM):
        for j in range(MM_TN):
            acc[i, j] = 0
    for k0 in range(0, K, MM_BK):
        # stage the tiles; consecutive threads read consecutive addresses
        for e in range(tid, MM_BK * MM_BM, nthr):
            if as1 == 1:
                mm = e // MM_BK
                kk = e % MM_BK
            else:
                kk = e // MM_BM
                mm = e % MM_BM
            if m0 + mm < M and k0 + kk < K:
                As[kk * MM_BMP + mm] = a[ao + (m0 + mm) * as0 + (k0 + kk) * as1]
            else:
                As[kk * MM_BMP + mm] = 0
        for e in range(tid, MM_BK * MM_BN, nthr):
            if bs1 == 1:
                kk = e // MM_BN
                nn = e % MM_BN
            else:
                nn = e // MM_BK
                kk = e % MM_BK
            if n0 + nn < N and k0 + kk < K:
                Bs[kk * MM_BNP + nn] = b[bo + (k0 + kk) * bs0 + (n0 + nn) * bs1]
            else:
                Bs[kk * MM_BNP + nn] = 0
        cuda.syncthreads()
        kn = MM_BK
        if SIM:   # skip the zero padding of a last, partial k-chunk (same sums)
            kn = min(MM_BK, K - k0)
        for kk in range(kn):
            for i in range(MM_TM):
                ar[i] = As[kk * MM_BMP + ty + i * MM_NY]
            for j in range(MM_TN):
                br[j] = Bs[kk * MM_BNP + tx + j * MM_NX]
            for i in range(MM_TM):
                for j in range(MM_TN):
                    acc[i, j] += ar[i] * br[j]
        cuda.syncthreads()
    for i in range(MM_TM):
        m = m0 + ty + i * MM_NY
        if m < M:
            for j in range(MM_TN):
                n = n0 + tx + j * MM_NX
                if n < N:
                    if dims[8]:
                        c[co + m * cs0 + n] += acc[i, j]
                    else:
                        c[co + m * cs0 + n] = acc[i, j]


@_kernel
def _transpose_whh_kernel(P, poff, WT, dims):
    """WT[d, k, j] = W_hh[d][j, k] for the directions of layer dims[1]."""
    H, k, D, GH = dims[0], dims[1], dims[2], dims[3]
    n = D * GH * H
    start = cuda.grid(1)
    stride = cuda.gridsize(1)
    for e in range(start, n, stride):
        d = e // (GH * H)
        r = e % (GH * H)
        j = r // H
        kk = r % H
        WT[(d * H + kk) * GH + j] = P[poff[k * D + d, 1] + r]


@_kernel
def _colsum_kernel(src, dst, dims):
    """dst[off + c] = sum_r src[r, c] for src (R, N)."""
    R, N, off = dims[0], dims[1], dims[2]
    start = cuda.grid(1)
    stride = cuda.gridsize(1)
    for cidx in range(start, N, stride):
        s = 0.0
        for r in range(R):
            s += src[r, cidx]
        dst[off + cidx] = s


@_kernel
def _ih_bias_grad_kernel(DELTA, tok, poff, Gr, dims):
    """Direction d = blockIdx.y of layer k: bias gradients (column sums of
    DELTA[d], into both bias_ih and bias_hh) and, for token ids, row j of
    dW_ih: dW_ih[j, tok[r]] += DELTA[d, r, j] (each thread owns whole rows,
    so no atomics and a deterministic sum).
    dims = (TB, GH, Ik, D, k, tokin, bias)."""
    TB, GH, Ik, D, k = dims[0], dims[1], dims[2], dims[3], dims[4]
    tokin, bias = dims[5], dims[6]
    d = cuda.blockIdx.y
    kd = k * D + d
    ioff = poff[kd, 0]
    start = cuda.threadIdx.x + cuda.blockIdx.x * cuda.blockDim.x
    stride = cuda.blockDim.x * cuda.gridDim.x
    for j in range(start, GH, stride):
        if tokin:
            for i in range(Ik):
                Gr[ioff + j * Ik + i] = 0
        s = 0.0
        for r in range(TB):
            v = DELTA[d, r, j]
            s += v
            if tokin:
                Gr[ioff + j * Ik + tok[r]] += v
        if bias:
            Gr[poff[kd, 2] + j] = s
            Gr[poff[kd, 3] + j] = s


@_kernel
def _range_kernel(a, lo, hi, out):
    """out[0] += number of entries of the int array a outside [lo, hi)."""
    start = cuda.grid(1)
    stride = cuda.gridsize(1)
    for i in range(start, a.shape[0], stride):
        v = a[i]
        if v < lo or v >= hi:
            cuda.atomic.add(out, 0, 1)


@_kernel
def _relayout1_kernel(src, dst):
    """dst[i] = src[i], converted to dst's dtype (src may be strided)."""
    for i in range(cuda.grid(1), dst.shape[0], cuda.gridsize(1)):
        dst[i] = src[i]


@_kernel
def _relayout2_kernel(src, dst, swap, lengths, mask):
    """dst[t, b] = src[b, t] (swap) or src[t, b], converted to dst's dtype;
    0 where mask and t >= lengths[b] (padding targets are ignored)."""
    n1 = dst.shape[1]
    for i in range(cuda.grid(1), dst.shape[0] * n1, cuda.gridsize(1)):
        t = i // n1
        b = i - t * n1
        if mask != 0 and t >= lengths[b]:
            dst[t, b] = 0
        elif swap != 0:
            dst[t, b] = src[b, t]
        else:
            dst[t, b] = src[t, b]


@_kernel
def _relayout3_kernel(src, dst, swap, lengths, mask):
    """dst[t, b, k] = src[b, t, k] (swap) or src[t, b, k], converted;
    0 where mask and t >= lengths[b] (whatever padding holds, NaN too, is
    ignored)."""
    n1, n2 = dst.shape[1], dst.shape[2]
    for i in range(cuda.grid(1), dst.shape[0] * n1 * n2, cuda.gridsize(1)):
        t = i // (n1 * n2)
        r = i - t * n1 * n2
        b = r // n2
        k = r - b * n2
        if mask != 0 and t >= lengths[b]:
            dst[t, b, k] = 0
        elif swap != 0:
            dst[t, b, k] = src[b, t, k]
        else:
            dst[t, b, k] = src[t, b, k]


# ============================================================================
# the recurrence, path "persistent": one block per (batch row, direction)
# ============================================================================
@_kernel
def _fwd_persistent_kernel(P, poff, WT, XP, tok, lengths, state0, SH, GA, lout,
                           state_n, dims):
    """The whole forward sequence of layer k for batch row b = blockIdx.x,
    direction d = blockIdx.y. Thread u-strided over hidden units; each thread
    computes all G gates of its units, so one barrier per step suffices
    (h is double-buffered in shared memory).
    dims = (T, B, H, Ik, D, mode, k, tokin, bias, wsm): wsm = 1 holds W_hh
    (transposed) in shared memory, 0 reads WT from global memory."""
    T, B, H, D, k, wsm = dims[0], dims[1], dims[2], dims[4], dims[6], dims[9]
    lstm = dims[5] == LSTM
    gru = dims[5] == GRU
    GH = (4 if lstm else 3 if gru else 1) * H
    b = cuda.blockIdx.x
    d = cuda.blockIdx.y
    kd = k * D + d
    tid = cuda.threadIdx.x
    nt = cuda.blockDim.x
    sm = cuda.shared.array(0, P.dtype)
    hb = sm[0:2 * H]          # h_{t-1} / h_t, double-buffered
    cb = sm[2 * H:3 * H]      # c of this thread's units
    if wsm:
        W = sm[3 * H:3 * H + GH * H]
        woff = poff[kd, 1]
        for e in range(tid, GH * H, nt):   # W[kk*GH + j] = W_hh[j, kk]
            W[(e % H) * GH + e // H] = P[woff + e]
        wbase = 0
    else:
        W = WT
        wbase = d * H * GH
    p0 = 0 if d == 0 else T + 1
    for u in range(tid, H, nt):
        hb[u] = state0[0, kd, b, u]
        SH[0, d, p0, b, u] = hb[u]
        if lstm:
            cb[u] = state0[1, kd, b, u]
            SH[1, d, p0, b, u] = cb[u]
    cuda.syncthreads()
    nb = lengths[b]
    for s in range(T):
        t = s if d == 0 else T - 1 - s
        cur = (s % 2) * H
        nxt = H - cur
        valid = t < nb
        for u in range(tid, H, nt):
            if valid:
                if lstm:
                    rec = _dot4(W, wbase + u, GH, H, hb, cur, H)
                elif gru:
                    q0, q1, q2 = _dot3(W, wbase + u, GH, H, hb, cur, H)
                    rec = (q0, q1, q2, q2)
                else:
                    r0 = _dot(W, wbase + u, GH, hb, cur, H)
                    rec = (r0, r0, r0, r0)
                cprev = hb[cur + u] if gru else cb[u]
                h, c = _unit_forward(dims, P, poff, XP, tok, GA, rec, cprev, d, t, b, u)
                if lstm:
                    cb[u] = c
                    SH[1, d, t + 1, b, u] = c
                hb[nxt + u] = h
                SH[0, d, t + 1, b, u] = hb[nxt + u]
                lout[t * B + b, d * H + u] = hb[nxt + u]
            else:   # padding: the state is carried, the output is zero
                hb[nxt + u] = hb[cur + u]
                SH[0, d, t + 1, b, u] = hb[cur + u]
                if lstm:
                    SH[1, d, t + 1, b, u] = cb[u]
                lout[t * B + b, d * H + u] = 0
        cuda.syncthreads()
    last = (T % 2) * H
    for u in range(tid, H, nt):
        state_n[0, kd, b, u] = hb[last + u]
        if lstm:
            state_n[1, kd, b, u] = cb[u]


@_kernel
def _bwd_persistent_kernel(P, poff, SH, GA, dl, lengths, dstate_n, DELTA,
                           dstate0, flow2, dims, sclip, DCS, DELTAH):
    """BPTT of layer k for batch row b = blockIdx.x, direction d = blockIdx.y,
    over all T steps: dh_t = dl_t + delta_{t+1} W_hh (the latter only if step
    t+1 was valid), optional clamp of dh_t to [-sclip, sclip], then
    delta_t = dL/da_t (zero at padding). The previous step's deltas are
    double-buffered in shared memory, dh and dc too (one barrier per step).
    dims = (T, B, H, D, mode, k, wsm, flow, use_sclip); flow2[t] (float64)
    accumulates |dh_t|^2 of valid rows when flow is set. DCS (T*B, D*H):
    dL/dc_t from outside (LSTM top layer), added to dc at valid steps; a
    (1, 1) zero when there is none (a 0-size device array types as layout
    "A"; the zero is harmless where T*B = D*H = 1 makes the shapes agree).
    GRU: the recurrent side's deltas go to DELTAH and to the shared buffer
    (W_hh multiplies them), and dh keeps the direct part dh z."""
    T, B, H, D, mode = dims[0], dims[1], dims[2], dims[3], dims[4]
    k, wsm, flow, use_sclip = dims[5], dims[6], dims[7], dims[8]
    lstm = mode == LSTM
    gru = mode == GRU
    G = 4 if lstm else 3 if gru else 1
    GH = G * H
    b = cuda.blockIdx.x
    d = cuda.blockIdx.y
    kd = k * D + d
    tid = cuda.threadIdx.x
    nt = cuda.blockDim.x
    sm = cuda.shared.array(0, P.dtype)
    ds = sm[0:2 * GH]             # delta_{t_prev} / delta_t
    dhs = sm[2 * GH:2 * GH + H]
    dcs = sm[2 * GH + H:2 * GH + 2 * H]
    woff = poff[kd, 1]
    if wsm:
        W = sm[2 * GH + 2 * H:2 * GH + 2 * H + GH * H]
        for e in range(tid, GH * H, nt):
            W[e] = P[woff + e]
        wbase = 0
    else:
        W = P
        wbase = woff
    for u in range(tid, H, nt):
        dhs[u] = dstate_n[0, kd, b, u]
        if lstm:
            dcs[u] = dstate_n[1, kd, b, u]
    cuda.syncthreads()
    nb = lengths[b]
    prev_valid = False
    prv = 0
    for s in range(T):
        t = T - 1 - s if d == 0 else s
        cur = (s % 2) * GH
        prv = GH - cur
        valid = t < nb
        for u in range(tid, H, nt):
            dh = dhs[u]
            if prev_valid:
                carry = _dot(W, wbase + u, H, ds, prv, GH)
                dh = dh + carry if gru else carry
            if valid:
                dh += dl[t * B + b, d * H + u]
                if use_sclip:
                    dh = min(max(dh, -sclip), sclip)
                if flow:
                    cuda.atomic.add(flow2, t, np.float64(dh) * np.float64(dh))
                if lstm:
                    pp = t if d == 0 else t + 2
                    gi = GA[d, t, b, u]
                    gf = GA[d, t, b, H + u]
                    gg = GA[d, t, b, 2 * H + u]
                    go = GA[d, t, b, 3 * H + u]
                    dcu = dcs[u]
                    if DCS.shape[0] == T * B and DCS.shape[1] == D * H:
                        dcu += DCS[t * B + b, d * H + u]
                    d0, d1, d2, d3, dcn = _lstm_cell_backward(
                        dh, dcu, gi, gf, gg, go, SH[1, d, t + 1, b, u],
                        SH[1, d, pp, b, u])
                    dcs[u] = dcn
                    ds[cur + u] = d0
                    ds[cur + H + u] = d1
                    ds[cur + 2 * H + u] = d2
                    ds[cur + 3 * H + u] = d3
                    DELTA[d, t * B + b, u] = ds[cur + u]
                    DELTA[d, t * B + b, H + u] = ds[cur + H + u]
                    DELTA[d, t * B + b, 2 * H + u] = ds[cur + 2 * H + u]
                    DELTA[d, t * B + b, 3 * H + u] = ds[cur + 3 * H + u]
                elif gru:
                    pp = t if d == 0 else t + 2
                    gr = GA[d, t, b, u]
                    dr, dz, dn, dh = _gru_cell_backward(
                        dh, gr, GA[d, t, b, H + u], GA[d, t, b, 2 * H + u],
                        GA[d, t, b, 3 * H + u], SH[0, d, pp, b, u])
                    DELTA[d, t * B + b, u] = dr
                    DELTA[d, t * B + b, H + u] = dz
                    DELTA[d, t * B + b, 2 * H + u] = dn
                    ds[cur + u] = dr
                    ds[cur + H + u] = dz
                    ds[cur + 2 * H + u] = gr * dn
                    DELTAH[d, t * B + b, u] = ds[cur + u]
                    DELTAH[d, t * B + b, H + u] = ds[cur + H + u]
                    DELTAH[d, t * B + b, 2 * H + u] = ds[cur + 2 * H + u]
                else:
                    ds[cur + u] = _dact(mode, SH[0, d, t + 1, b, u]) * dh
                    DELTA[d, t * B + b, u] = ds[cur + u]
            else:
                for g in range(G):
                    DELTA[d, t * B + b, g * H + u] = 0
                    if gru:
                        DELTAH[d, t * B + b, g * H + u] = 0
            dhs[u] = dh
        prev_valid = valid
        cuda.syncthreads()
    # dL/dh0: through W_hh if the last step processed (t = 0 forward,
    # t = T-1 reverse) was valid
    last = ((T - 1) % 2) * GH
    for u in range(tid, H, nt):
        dh = dhs[u]
        if prev_valid:
            carry = _dot(W, wbase + u, H, ds, last, GH)
            dh = dh + carry if gru else carry
        dstate0[0, kd, b, u] = dh
        if lstm:
            dstate0[1, kd, b, u] = dcs[u]


# ============================================================================
# the recurrence, path "step": one launch per time step
# ============================================================================
@_kernel
def _fwd_step_kernel(P, poff, WT, XP, tok, lengths, state0, SH, GA, lout,
                     state_n, dims, s):
    """Step s of layer k's forward recurrence, both directions (blockIdx.z).
    Block: STEP_NU hidden units (one per thread) x STEP_RB batch rows; the
    rows' h_{t-1} is staged in shared memory STEP_KT columns at a time; each
    thread accumulates all G gates of its unit for all STEP_RB rows.
    dims as _fwd_persistent_kernel (wsm unused)."""
    T, B, H, D, k = dims[0], dims[1], dims[2], dims[4], dims[6]
    lstm = dims[5] == LSTM
    gru = dims[5] == GRU
    G = 4 if lstm else 3 if gru else 1
    GH = G * H
    d = cuda.blockIdx.z
    kd = k * D + d
    tid = cuda.threadIdx.x
    u = cuda.blockIdx.x * STEP_NU + tid
    b0 = cuda.blockIdx.y * STEP_RB
    t = s if d == 0 else T - 1 - s
    hp = t if d == 0 else t + 2          # index of h_{t-1} in SH
    hs = cuda.shared.array(0, P.dtype)     # dynamic: STEP_RB x STEP_KT
    acc = cuda.local.array(STEP_ACC, P.dtype)
    for e in range(STEP_ACC):
        acc[e] = 0
    for k0 in range(0, H, STEP_KT):
        for e in range(tid, STEP_RB * STEP_KT, STEP_NU):
            r = e // STEP_KT
            kk = e % STEP_KT
            if b0 + r < B and k0 + kk < H:
                if s == 0:
                    hs[r * STEP_KT + kk] = state0[0, kd, b0 + r, k0 + kk]
                else:
                    hs[r * STEP_KT + kk] = SH[0, d, hp, b0 + r, k0 + kk]
            else:
                hs[r * STEP_KT + kk] = 0
        cuda.syncthreads()
        if u < H:
            for kk in range(min(STEP_KT, H - k0)):
                for g in range(G):
                    w = WT[(d * H + k0 + kk) * GH + g * H + u]
                    for r in range(STEP_RB):
                        acc[g * STEP_RB + r] += w * hs[r * STEP_KT + kk]
        cuda.syncthreads()
    if u >= H:
        return
    for r in range(STEP_RB):
        b = b0 + r
        if b >= B:
            break
        if s == 0:   # the initial state goes to SH too (BPTT reads it)
            SH[0, d, hp, b, u] = state0[0, kd, b, u]
            if lstm:
                SH[1, d, hp, b, u] = state0[1, kd, b, u]
        if t < lengths[b]:
            rec = (acc[r], acc[STEP_RB + r], acc[2 * STEP_RB + r], acc[3 * STEP_RB + r])
            if lstm:
                c_prev = SH[1, d, hp, b, u]
            elif gru:
                c_prev = SH[0, d, hp, b, u]
            else:
                c_prev = acc[r]
            h, c = _unit_forward(dims, P, poff, XP, tok, GA, rec, c_prev, d, t, b, u)
            if lstm:
                SH[1, d, t + 1, b, u] = c
            SH[0, d, t + 1, b, u] = h
            lout[t * B + b, d * H + u] = SH[0, d, t + 1, b, u]
        else:
            SH[0, d, t + 1, b, u] = SH[0, d, hp, b, u]
            if lstm:
                SH[1, d, t + 1, b, u] = SH[1, d, hp, b, u]
            lout[t * B + b, d * H + u] = 0
        if s == T - 1:
            state_n[0, kd, b, u] = SH[0, d, t + 1, b, u]
            if lstm:
                state_n[1, kd, b, u] = SH[1, d, t + 1, b, u]


@_kernel
def _bwd_step_kernel(P, poff, SH, GA, dl, lengths, dstate_n, DELTA, DHC,
                     dstate0, flow2, dims, sclip, s, DCS, DELTAH):
    """Step s of layer k's BPTT, both directions (blockIdx.z); s == T is the
    final pass that writes dL/dh0 and dL/dc0. Block: STEP_NU hidden units x
    STEP_RB batch rows; the carry delta_{t_prev} W_hh is a small product over
    G*H, the rows' deltas staged in shared memory STEP_KT at a time. dh and
    dc are carried between launches in DHC (2, D, B, H).
    dims, DCS and DELTAH as _bwd_persistent_kernel (wsm unused); for the
    GRU DHC[0] carries the direct part dh z."""
    T, B, H, D, mode = dims[0], dims[1], dims[2], dims[3], dims[4]
    k, flow, use_sclip = dims[5], dims[7], dims[8]
    lstm = mode == LSTM
    gru = mode == GRU
    G = 4 if lstm else 3 if gru else 1
    GH = G * H
    d = cuda.blockIdx.z
    kd = k * D + d
    tid = cuda.threadIdx.x
    u = cuda.blockIdx.x * STEP_NU + tid
    b0 = cuda.blockIdx.y * STEP_RB
    woff = poff[kd, 1]
    # the step processed by the previous launch, and this launch's step
    tp = (T - s if d == 0 else s - 1)
    t = (T - 1 - s if d == 0 else s)
    ds = cuda.shared.array(0, P.dtype)     # dynamic: STEP_RB x STEP_KT
    acc = cuda.local.array(STEP_ACC, P.dtype)
    for e in range(STEP_RB):
        acc[e] = 0
    if s > 0:
        for c0 in range(0, GH, STEP_KT):
            for e in range(tid, STEP_RB * STEP_KT, STEP_NU):
                r = e // STEP_KT
                cc = e % STEP_KT
                if b0 + r < B and c0 + cc < GH:
                    if gru:
                        ds[r * STEP_KT + cc] = DELTAH[d, tp * B + b0 + r, c0 + cc]
                    else:
                        ds[r * STEP_KT + cc] = DELTA[d, tp * B + b0 + r, c0 + cc]
                else:
                    ds[r * STEP_KT + cc] = 0
            cuda.syncthreads()
            if u < H:
                for cc in range(min(STEP_KT, GH - c0)):
                    w = P[woff + (c0 + cc) * H + u]
                    for r in range(STEP_RB):
                        acc[r] += ds[r * STEP_KT + cc] * w
            cuda.syncthreads()
    if u >= H:
        return
    for r in range(STEP_RB):
        b = b0 + r
        if b >= B:
            break
        nb = lengths[b]
        if s == 0:
            dh = dstate_n[0, kd, b, u]
            dc = dstate_n[1, kd, b, u] if lstm else dh * 0
        else:
            if tp >= nb:
                dh = DHC[0, d, b, u]
            elif gru:
                dh = DHC[0, d, b, u] + acc[r]
            else:
                dh = acc[r]
            dc = DHC[1, d, b, u]
        if s == T:
            dstate0[0, kd, b, u] = dh
            if lstm:
                dstate0[1, kd, b, u] = dc
            continue
        row = t * B + b
        if t < nb:
            dh += dl[row, d * H + u]
            if use_sclip:
                dh = min(max(dh, -sclip), sclip)
            if flow:
                cuda.atomic.add(flow2, t, np.float64(dh) * np.float64(dh))
            if lstm:
                pp = t if d == 0 else t + 2
                if DCS.shape[0] == T * B and DCS.shape[1] == D * H:
                    dc += DCS[row, d * H + u]
                d0, d1, d2, d3, dc = _lstm_cell_backward(
                    dh, dc, GA[d, t, b, u], GA[d, t, b, H + u],
                    GA[d, t, b, 2 * H + u], GA[d, t, b, 3 * H + u],
                    SH[1, d, t + 1, b, u], SH[1, d, pp, b, u])
                DELTA[d, row, u] = d0
                DELTA[d, row, H + u] = d1
                DELTA[d, row, 2 * H + u] = d2
                DELTA[d, row, 3 * H + u] = d3
            elif gru:
                pp = t if d == 0 else t + 2
                gr = GA[d, t, b, u]
                dr, dz, dn, dh = _gru_cell_backward(
                    dh, gr, GA[d, t, b, H + u], GA[d, t, b, 2 * H + u],
                    GA[d, t, b, 3 * H + u], SH[0, d, pp, b, u])
                DELTA[d, row, u] = dr
                DELTA[d, row, H + u] = dz
                DELTA[d, row, 2 * H + u] = dn
                DELTAH[d, row, u] = dr
                DELTAH[d, row, H + u] = dz
                DELTAH[d, row, 2 * H + u] = gr * dn
            else:
                DELTA[d, row, u] = _dact(mode, SH[0, d, t + 1, b, u]) * dh
        else:
            for g in range(G):
                DELTA[d, row, g * H + u] = 0
                if gru:
                    DELTAH[d, row, g * H + u] = 0
        DHC[0, d, b, u] = dh
        if lstm:
            DHC[1, d, b, u] = dc


# ============================================================================
# read-out, loss, norm, clipping, optimizer
# ============================================================================
@_kernel
def _gather_last_kernel(top, lengths, HL, dims):
    """HL[b] = top[(lengths[b]-1)*B + b]: each sequence's last valid output."""
    B, DH = dims[0], dims[1]
    start = cuda.grid(1)
    stride = cuda.gridsize(1)
    for e in range(start, B * DH, stride):
        b = e // DH
        j = e % DH
        HL[b, j] = top[(lengths[b] - 1) * B + b, j]


@_kernel
def _scatter_last_kernel(DHL, lengths, dtop, dims):
    """dtop[t*B + b] = DHL[b] at t = lengths[b]-1, zero elsewhere."""
    T, B, DH = dims[0], dims[1], dims[2]
    start = cuda.grid(1)
    stride = cuda.gridsize(1)
    for e in range(start, T * B * DH, stride):
        row = e // DH
        j = e % DH
        t = row // B
        b = row % B
        if t == lengths[b] - 1:
            dtop[row, j] = DHL[b, j]
        else:
            dtop[row, j] = 0


@_kernel
def _loss_kernel(Z, P, lengths, yi, yf, DZ, LROW, dims):
    """Per read-out row r: add the bias to the logits Z[r] (zero them at
    padding steps); with dims[6] also the loss of the row (float64, LROW[r])
    and dZ[r] = dloss/dz (already divided by B; zero at padding).
    dims = (R, O, B, last, loss_kind, bout, want_loss); row r is step r // B
    of sequence r % B (readout 'all') or sequence r ('last')."""
    R, O, B, last, kind, bout, want = (dims[0], dims[1], dims[2], dims[3],
                                       dims[4], dims[5], dims[6])
    inv_b = 1.0 / B
    start = cuda.grid(1)
    stride = cuda.gridsize(1)
    for r in range(start, R, stride):
        valid = True if last else (r // B) < lengths[r % B]
        if not valid:
            for o in range(O):
                Z[r, o] = 0
                DZ[r, o] = 0
            LROW[r] = 0
            continue
        for o in range(O):
            Z[r, o] += P[bout + o]
        if not want:
            continue
        if kind == 0:   # softmax cross-entropy
            y = yi[r]
            m = np.float64(Z[r, 0])
            for o in range(1, O):
                if Z[r, o] > m:
                    m = np.float64(Z[r, o])
            ssum = 0.0
            for o in range(O):
                ssum += math.exp(np.float64(Z[r, o]) - m)
            for o in range(O):
                DZ[r, o] = math.exp(np.float64(Z[r, o]) - m) / ssum * inv_b
            DZ[r, y] -= inv_b
            LROW[r] = m + math.log(ssum) - np.float64(Z[r, y])
        else:           # mean squared error over the O outputs
            acc = 0.0
            for o in range(O):
                diff = np.float64(Z[r, o]) - np.float64(yf[r, o])
                acc += diff * diff
                DZ[r, o] = 2.0 * diff / O * inv_b
            LROW[r] = acc / O


@_kernel
def _sumsq_kernel(Gr, part, limit):
    """Per block: part[block, 0] = sum of g^2 (float64), part[block, 1] =
    number of |g| > limit (ClipValue's 'clipped')."""
    sm = cuda.shared.array(0, part.dtype)  # dynamic: 2 * TPB float64
    sq = sm[0:TPB]
    cnt = sm[TPB:2 * TPB]
    tid = cuda.threadIdx.x
    s = 0.0
    n = 0.0
    for j in range(cuda.grid(1), Gr.shape[0], cuda.gridsize(1)):
        v = np.float64(Gr[j])
        s += v * v
        if abs(v) > limit:
            n += 1.0
    sq[tid] = s
    cnt[tid] = n
    cuda.syncthreads()
    w = TPB // 2
    while w > 0:
        if tid < w:
            sq[tid] += sq[tid + w]
            cnt[tid] += cnt[tid + w]
        cuda.syncthreads()
        w //= 2
    if tid == 0:
        part[cuda.blockIdx.x, 0] = sq[0]
        part[cuda.blockIdx.x, 1] = cnt[0]


@_kernel
def _finalize_kernel(part, LROW, RES, dims, limit):
    """One block: loss = sum(LROW)/B, grad norm = sqrt(sum of partials), the
    non-finite guard and the clipping decision, into RES = (loss, grad_norm,
    clipped, skipped, scale). dims = (nparts, R, B, clip)."""
    nparts, R, B, clip = dims[0], dims[1], dims[2], dims[3]
    sm = cuda.shared.array(0, part.dtype)  # dynamic: 3 * TPB float64
    sq = sm[0:TPB]
    cnt = sm[TPB:2 * TPB]
    ls = sm[2 * TPB:3 * TPB]
    tid = cuda.threadIdx.x
    a = 0.0
    n = 0.0
    lsum = 0.0
    for i in range(tid, nparts, TPB):
        a += part[i, 0]
        n += part[i, 1]
    for r in range(tid, R, TPB):
        lsum += LROW[r]
    sq[tid] = a
    cnt[tid] = n
    ls[tid] = lsum
    cuda.syncthreads()
    w = TPB // 2
    while w > 0:
        if tid < w:
            sq[tid] += sq[tid + w]
            cnt[tid] += cnt[tid + w]
            ls[tid] += ls[tid + w]
        cuda.syncthreads()
        w //= 2
    if tid == 0:
        loss = ls[0] / B
        gnorm = math.sqrt(sq[0])
        RES[0] = loss
        RES[1] = gnorm
        RES[2] = 0.0
        RES[4] = 1.0
        if math.isfinite(loss) and math.isfinite(gnorm):
            RES[3] = 0.0
            if clip == 1 and gnorm > limit:
                RES[2] = 1.0
                RES[4] = limit / gnorm
            elif clip == 2 and cnt[0] > 0:
                RES[2] = 1.0
        else:
            RES[3] = 1.0


@_device
def _updated(Pm, Gr, M, j, opt, clip, scale, hyper):
    """Element j after clipping and one optimizer update (PyTorch's rules),
    nothing written: (g, param, m, v), computed in float64 (stored rounded
    to the arrays' dtype). hyper as in _update_kernel."""
    lr, mom, b1, b2, eps, limit = hyper[0], hyper[1], hyper[2], hyper[3], hyper[4], hyper[5]
    g = Gr[j]
    if clip == 1:
        g = g * scale
    elif clip == 2:
        g = min(max(g, -limit), limit)
    p = Pm[j]
    mj = M[0, j]
    vj = M[1, j]
    if opt == 0:
        if mom != 0:
            mj = mom * mj + g
            p = p - lr * mj
        else:
            p = p - lr * g
    elif opt == 1:
        mj = b1 * mj + (1 - b1) * g
        vj = b2 * vj + (1 - b2) * g * g
        p = p - hyper[6] * mj / (math.sqrt(vj) / hyper[7] + eps)
    else:
        mj = mj + g * g
        p = p - lr * g / (math.sqrt(mj) + eps)
    return g, p, mj, vj


@_kernel
def _update_check_kernel(Pm, Gr, M, RES, dims, hyper):
    """The first half of an atomic update: computes every new parameter and
    moment without writing them, and marks the step skipped (RES[3] = 1)
    if any of them would not be finite in the arrays' dtype (|value| >
    hyper[8], the largest float64 that rounds to a finite one; NaN fails
    the comparison too). Nothing when the step is already skipped."""
    if RES[3] != 0:
        return
    opt, clip = dims[0], dims[1]
    write_m = opt != 0 or hyper[1] != 0
    bound = hyper[8]
    scale = RES[4]
    for j in range(cuda.grid(1), Pm.shape[0], cuda.gridsize(1)):
        g, p, mj, vj = _updated(Pm, Gr, M, j, opt, clip, scale, hyper)
        if not (abs(p) <= bound and (abs(mj) <= bound or not write_m)
                and (abs(vj) <= bound or opt != 1)):
            RES[3] = 1.0     # every thread that finds one writes the same value


@_kernel
def _update_kernel(Pm, Gr, M, RES, dims, hyper):
    """Clipping and one optimizer update (PyTorch's rules) over the flat
    arrays; nothing at all when RES[3] (skipped) is set, by the guard or by
    _update_check_kernel (launched before it).
    dims = (opt, clip); hyper = (lr, momentum, beta1, beta2, eps, limit,
    lr / (1 - beta1^t), sqrt(1 - beta2^t), finite bound of the dtype)."""
    if RES[3] != 0:
        return
    opt, clip = dims[0], dims[1]
    write_m = opt != 0 or hyper[1] != 0
    scale = RES[4]
    for j in range(cuda.grid(1), Pm.shape[0], cuda.gridsize(1)):
        g, p, mj, vj = _updated(Pm, Gr, M, j, opt, clip, scale, hyper)
        Gr[j] = g
        Pm[j] = p
        if write_m:
            M[0, j] = mj
        if opt == 1:
            M[1, j] = vj


def _finite_bound(dtype):
    """The largest float64 that rounds to a finite number of dtype."""
    if np.dtype(dtype) == np.float64:
        return float(np.finfo(np.float64).max)
    fmax = float(np.finfo(dtype).max)
    below = float(np.nextafter(np.finfo(dtype).max, np.array(0, dtype)))
    return float(np.nextafter(fmax + (fmax - below) / 2, 0.0))   # ties go to inf


# ============================================================================
# host side: launches, workspace, the backend functions
# ============================================================================
@contextlib.contextmanager
def _simulated():
    """Around a simulated launch. The simulator runs each CUDA thread as a
    Python thread and polls them at every barrier: a short GIL switch
    interval makes that ~20x faster. Its arithmetic is NumPy scalars', which
    warn on overflow where a GPU silently gives inf: silence that."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            yield
    finally:
        sys.setswitchinterval(old)


if SIM:
    from numba.cuda.simulator.args import ArgHint as _ArgHint

    class _Storage(_ArgHint):
        """Simulator only: hand a kernel the simulated device array's own
        NumPy storage. The simulator would wrap it in two proxy layers whose
        element access costs ~1.5 us; the memory (and the kernel code) is the
        same either way."""

        def to_device(self, retr, stream=0):
            return self.value._ary


def _launch(kern, grid, block, args, shmem=0):
    if SIM:
        args = tuple(_Storage(a) if getattr(a, "__cuda_ndarray__", False) else a
                     for a in args)
        with _simulated():
            kern[grid, block, 0, shmem](*args)
    else:
        kern[grid, block, 0, shmem](*args)


def _grid1(n):
    return max(1, min((n + TPB - 1) // TPB, MAX_BLOCKS))


def _matmul(a, b, c, M, N, K, astr, bstr, cs0, accumulate=False, batch=1,
            bstrides=(0, 0, 0)):
    """c = a @ b (c += ... when accumulate) through _mm_kernel; a, b, c are
    1-D device views starting at the first batch's first element."""
    grid = ((N + MM_BN - 1) // MM_BN, (M + MM_BM - 1) // MM_BM, batch)
    dims = tuple(int(v) for v in (M, N, K, astr[0], astr[1], bstr[0], bstr[1], cs0,
                                  accumulate) + tuple(bstrides))
    shm = MM_BK * (MM_BMP + MM_BNP) * c.dtype.itemsize
    _launch(_mm_kernel, grid, (MM_NX, MM_NY), (a, b, c, dims), shm)


def _persist_threads(H):
    if PERSIST_NT:
        return PERSIST_NT
    return min(512, max(32, (H + 31) // 32 * 32))


def _smem_elems(spec):
    """Shared-memory elements of the persistent kernels with W_hh on chip."""
    GH, H = spec.G * spec.H, spec.H
    return GH * H + 2 * GH + 3 * H


def choose_path(spec, B, dtype):
    """("persistent" | "step", W_hh in shared memory?) for this shape; see the
    module docstring."""
    item = np.dtype(dtype).itemsize
    wsm = _smem_elems(spec) * item <= PERSIST_SMEM_BYTES
    if PATH == "step":
        return "step", False
    if PATH == "persistent" or wsm:
        return "persistent", wsm
    wbytes = spec.G * spec.H * spec.H * item
    if wbytes <= PERSIST_MAX_W_BYTES and B <= PERSIST_MAX_B:
        return "persistent", False
    return "step", False


def kernel_signatures(dtype):
    """{kernel: argument types} of every launch this module makes, for one
    float dtype (float32 or float64). precompile() compiles them; the tests
    check that launches use exactly these types and, where NVVM is
    installed, compile them for a real GPU without one."""
    from numba import types as nt
    from numba.np.numpy_support import from_dtype
    f = from_dtype(np.dtype(dtype))
    A = [None] + [nt.Array(f, n, "C") for n in range(1, 6)]
    F1, F2 = nt.Array(nt.float64, 1, "C"), nt.Array(nt.float64, 2, "C")
    I1, I2 = nt.Array(nt.int64, 1, "C"), nt.Array(nt.int64, 2, "C")
    i8, f8 = nt.int64, nt.float64

    def ints(n):
        return nt.UniTuple(i8, n)

    fwd = (A[1], I2, A[1], A[3], I1, I1, A[4], A[5], A[4], A[2], A[4], ints(10))
    bwd = (A[1], I2, A[5], A[4], A[2], I1, A[4], A[3])
    return {
        _mm_kernel: (A[1], A[1], A[1], ints(12)),
        _transpose_whh_kernel: (A[1], I2, A[1], ints(4)),
        _colsum_kernel: (A[2], A[1], ints(3)),
        _ih_bias_grad_kernel: (A[3], I1, I2, A[1], ints(7)),
        _range_kernel: (I1, i8, i8, I1),
        _fwd_persistent_kernel: fwd,
        _fwd_step_kernel: fwd + (i8,),
        _bwd_persistent_kernel: bwd + (A[4], F1, ints(9), f8, A[2], A[3]),
        _bwd_step_kernel: bwd + (A[4], A[4], F1, ints(9), f8, i8, A[2], A[3]),
        _gather_last_kernel: (A[2], I1, A[2], ints(2)),
        _scatter_last_kernel: (A[2], I1, A[2], ints(3)),
        _loss_kernel: (A[2], A[1], I1, I1, A[2], A[2], F1, ints(7)),
        _sumsq_kernel: (A[1], F2, f8),
        _finalize_kernel: (F2, F1, F1, ints(4), f8),
        _update_check_kernel: (A[1], A[1], A[2], F1, ints(2), nt.UniTuple(f8, 9)),
        _update_kernel: (A[1], A[1], A[2], F1, ints(2), nt.UniTuple(f8, 9)),
    }


def relayout_signatures(dtype):
    """[(kernel, argument types)] of the relayout kernels that read device
    inputs in place, for C-contiguous inputs already of the model's dtype
    (floats) or int64 (ids), and the other float dtype and int32 ids
    (converted). Other input types (strided, ...) compile on first use."""
    from numba import types as nt
    from numba.np.numpy_support import from_dtype
    f = from_dtype(np.dtype(dtype))
    other = nt.float32 if f == nt.float64 else nt.float64
    A2, A3 = nt.Array(f, 2, "C"), nt.Array(f, 3, "C")
    I1, I2 = nt.Array(nt.int64, 1, "C"), nt.Array(nt.int64, 2, "C")
    i8 = nt.int64
    return [(_relayout3_kernel, (A3, A3, i8, I1, i8)),
            (_relayout3_kernel, (nt.Array(other, 3, "C"), A3, i8, I1, i8)),   # converts
            (_relayout2_kernel, (I2, I2, i8, I1, i8)),
            (_relayout2_kernel, (nt.Array(nt.int32, 2, "C"), I2, i8, I1, i8)),
            (_relayout2_kernel, (A2, A2, i8, I1, i8)),
            (_relayout1_kernel, (I1, I1))]


def precompile(dtypes=(np.float32, np.float64)):
    """Compile every kernel for these dtypes now (on a GPU; a no-op in the
    simulator), instead of on the first training step."""
    if SIM or cuda is None:
        return
    for dt in dtypes:
        for kern, sig in list(kernel_signatures(dt).items()) + relayout_signatures(dt):
            kern.compile(sig)


def _is_device_array(a):
    return cuda is not None and (isinstance(a, DeviceSeq)
                                 or getattr(a, "__cuda_ndarray__", False)
                                 or hasattr(a, "__cuda_array_interface__"))


def _put(dst, a, what, lengths=None, mask=False):
    """Copy host or device array ``a`` into the device buffer ``dst`` (same
    number of elements); a device array must already have dst's dtype. A
    DeviceSeq (a device array the layers validated) is read in place by one
    kernel that swaps its first two axes if asked, converts its dtype and,
    with mask, zeroes the entries of padding steps (t >= lengths[b]; lengths
    is the device copy, needed for 2-D arrays).
    Returns whether ``a`` came from the device (its values are unchecked)."""
    if isinstance(a, DeviceSeq):
        src = a.array
        if not getattr(src, "__cuda_ndarray__", False):
            src = cuda.as_cuda_array(src)
        d = dst.reshape(a.shape)
        n = _grid1(a.size)
        if a.ndim == 1:
            _launch(_relayout1_kernel, n, TPB, (src, d))
        elif a.ndim == 2:
            _launch(_relayout2_kernel, n, TPB, (src, d, int(a.swap), lengths, int(mask)))
        else:
            _launch(_relayout3_kernel, n, TPB, (src, d, int(a.swap), lengths, int(mask)))
        return True
    if _is_device_array(a):
        if not getattr(a, "__cuda_ndarray__", False):
            a = cuda.as_cuda_array(a)
        if np.dtype(a.dtype) != np.dtype(dst.dtype):
            raise TypeError(f"{what}: expected a device array of dtype {dst.dtype}, "
                            f"got {a.dtype}")
        if a.size != dst.size:
            raise ValueError(f"{what}: expected {dst.size} elements, got {a.size}")
        if mask and a.ndim == 3:   # copied by the kernel that blanks padding
            _launch(_relayout3_kernel, _grid1(a.size), TPB,
                    (a, dst.reshape(a.shape), 0, lengths, 1))
        else:
            dst.copy_to_device(a.reshape(dst.shape) if a.shape != dst.shape else a)
        return True
    h = np.ascontiguousarray(a, dtype=dst.dtype)
    if h.size != dst.size:
        raise ValueError(f"{what}: expected {dst.size} elements, got {h.size}")
    dst.copy_to_device(h.reshape(dst.shape))
    return False


class _Ctx:
    """Per-caller device state: the workspace for the last shape, and the
    parameter, gradient and moment buffers. Kept in the caller's ctx dict.

    train_step's device copies: ``cur`` is the key of the host state they
    equal (host buffers' _mirror records and versions) or None; ``held``
    weak references to the host arrays (flat, opt_state or None) the device
    copies are newer than, or None. Weak: _mirror's record of this holder
    lives as long as the host array, so a strong one would keep both alive
    for ever; once the array is gone nobody can ask for it."""

    def __init__(self):
        self.key = None
        self.pkey = None
        self.w = {}
        self.cur = None
        self.held = None

    def pull(self):
        """Copy the newer parameters (and moments) back to the host arrays."""
        if self.held is None:
            return
        flat, opt = (r() if r is not None else None for r in self.held)
        self.held = None
        _mirror.drop(self)
        if flat is not None:
            self.P.copy_to_host(flat)
        if opt is not None:
            self.M.copy_to_host(opt)


def _ctx(ctx):
    return ctx_state(ctx, "cuda", _Ctx)


def _alloc(shape, dtype):
    return cuda.device_array(tuple(int(v) for v in shape), dtype=dtype)


def _prepare(c, spec, dtype, T, B, tok):
    """(Re)allocate the workspace when the shape changes."""
    dtype = np.dtype(dtype)
    key = (spec, dtype, T, B, tok)
    if c.pkey != (spec, dtype):
        c.pull()
        c.cur = None
        n = spec._n_total
        c.P = cuda.device_array(n, dtype=dtype)
        c.G = cuda.device_array(n, dtype=dtype)
        c.M = None
        c.pkey = (spec, dtype)
    if c.key == key:
        return c.w
    L, D, H, I, S, O = spec.L, spec.D, spec.H, spec.I, spec.S, max(spec.O, 1)
    GH = spec.G * H
    TB, DH = T * B, D * H
    W = max(I, DH)
    gated = spec.mode in ("lstm", "gru")
    f8, i8 = np.float64, np.int64
    w = dict(
        SH=_alloc((L, S, D, T + 2, B, H), dtype),
        GA=_alloc((L, D, T, B, 4 * H) if gated else (1, 1, 1, 1, 1), dtype),
        LOUT=_alloc((L, TB, DH), dtype),
        XP=_alloc((D, TB, GH) if not tok or L > 1 else (1, 1, 1), dtype),
        WT=_alloc((D * H * GH,), dtype),
        DELTA=_alloc((D, TB, GH), dtype),
        DELTAH=_alloc((D, TB, GH) if spec.mode == "gru" else (1, 1, 1), dtype),
        DL=[_alloc((TB * W,), dtype), _alloc((TB * W,), dtype)],
        DHC=_alloc((2, D, B, H), dtype),
        Z=_alloc((TB, O), dtype), DZ=_alloc((TB, O), dtype),
        HL=_alloc((B, DH), dtype), DHL=_alloc((B, DH), dtype),
        LROW=_alloc((TB,), f8), PART=_alloc((NRED, 2), f8), RES=_alloc((8,), f8),
        FLOW2=_alloc((T,), f8), CHK=_alloc((1,), i8),
        X=_alloc((TB, I) if not tok else (1, 1), dtype),
        TOK=_alloc((TB,) if tok else (1,), i8), LEN=_alloc((B,), i8),
        ST0=_alloc((S, L * D, B, H), dtype), STN=_alloc((S, L * D, B, H), dtype),
        DST=_alloc((S, L * D, B, H), dtype), DST0=_alloc((S, L * D, B, H), dtype),
        YI=_alloc((TB,), i8), YF=_alloc((TB, O), dtype),
        POFF=cuda.to_device(np.ascontiguousarray(param_offsets(spec), dtype=i8)),
    )
    c.w = w
    c.key = key
    return w


def _check_range(w, dev, n, lo, hi, what):
    """Range check of integer inputs that arrived as device arrays (host
    arrays are checked by the callers before anything runs)."""
    chk = w["CHK"]
    chk.copy_to_device(np.zeros(1, np.int64))
    _launch(_range_kernel, _grid1(n), TPB, (dev, lo, hi, chk))
    bad = int(chk.copy_to_host()[0])
    if bad:
        raise ValueError(f"{what}: {bad} value(s) outside [{lo}, {hi - 1}]")


def _inputs(c, spec, flat, x, lengths, state0, upload=True):
    """Workspace for this call with (unless upload is False) the
    parameters, and x, lengths and state0 on the device. Returns (w, T, B, tok)."""
    T, B = int(x.shape[0]), int(x.shape[1])
    tok = np.dtype(x.dtype).kind in "iu"
    w = _prepare(c, spec, flat.dtype, T, B, tok)
    if upload:
        c.P.copy_to_device(flat)
    if _put(w["LEN"], lengths if _is_device_array(lengths)
            else np.asarray(lengths, dtype=np.int64), "lengths"):
        _check_range(w, w["LEN"], B, 1, T + 1, "lengths")
    if tok:
        if (_is_device_array(x) and not isinstance(x, DeviceSeq)
                and np.dtype(x.dtype) != np.int64):
            raise TypeError(f"x: token ids on the device must be int64, got {x.dtype}")
        if _put(w["TOK"], x, "x", w["LEN"]):
            _check_range(w, w["TOK"], T * B, 0, spec.I, "x: token ids")
    else:   # padding steps zeroed on the way (host arrays come zeroed)
        _put(w["X"], x, "x", w["LEN"], mask=True)
    _put(w["ST0"], state0, "state0")
    return w, T, B, tok


def _dims(spec, T, B, k, tok, wsm=False):
    Ik = spec.I if k == 0 else spec.D * spec.H
    return tuple(int(v) for v in (T, B, spec.H, Ik, spec.D, _MODES[spec.mode], k,
                                  tok and k == 0, spec.bias, wsm))


def _forward(c, w, spec, T, B, tok, path):
    """All layers: projection, recurrence. Top output in w["LOUT"][L-1]."""
    P = c.P
    H, D, L, GH = spec.H, spec.D, spec.L, spec.G * spec.H
    TB = T * B
    poff = param_offsets(spec)
    item = P.dtype.itemsize
    route, wsm = path
    for k in range(L):
        Ik = spec.I if k == 0 else D * H
        tokin = tok and k == 0
        if not tokin:   # XP[d] = x @ W_ih[d]^T for both directions at once
            xin = w["X"].ravel() if k == 0 else w["LOUT"][k - 1].ravel()
            i0 = poff[k * D, 0]
            sb = poff[k * D + 1, 0] - i0 if D == 2 else 0
            _matmul(xin, P[i0:], w["XP"].ravel(), TB, GH, Ik, (Ik, 1), (1, Ik), GH,
                    batch=D, bstrides=(0, sb, TB * GH))
        if not (route == "persistent" and wsm):
            _launch(_transpose_whh_kernel, _grid1(D * GH * H), TPB,
                    (P, w["POFF"], w["WT"], (H, k, D, GH)))
        dims = _dims(spec, T, B, k, tok, wsm)
        args = (P, w["POFF"], w["WT"], w["XP"], w["TOK"], w["LEN"], w["ST0"],
                w["SH"][k], w["GA"][k] if spec.mode in ("lstm", "gru") else w["GA"][0],
                w["LOUT"][k], w["STN"], dims)
        if route == "persistent":
            shm = (3 * H + (GH * H if wsm else 0)) * item
            _launch(_fwd_persistent_kernel, (B, D), _persist_threads(H), args, shm)
        else:
            grid = ((H + STEP_NU - 1) // STEP_NU, (B + STEP_RB - 1) // STEP_RB, D)
            for s in range(T):
                _launch(_fwd_step_kernel, grid, STEP_NU, args + (s,),
                        STEP_RB * STEP_KT * item)


def _readout(c, w, spec, T, B, want_loss):
    """Logits (with bias, zero at padding) into w["Z"][:R]; with want_loss
    also the per-row losses, dZ, the read-out gradients into c.G and dL/dtop
    into w["DL"][0] (as (T*B, D*H)). Returns R (number of read-out rows)."""
    P, Gr = c.P, c.G
    H, D, O = spec.H, spec.D, spec.O
    DH, TB = D * H, T * B
    wout, bout = out_offsets(spec)
    top = w["LOUT"][spec.L - 1]
    last = spec.readout == "last"
    if last:
        _launch(_gather_last_kernel, _grid1(B * DH), TPB, (top, w["LEN"], w["HL"], (B, DH)))
        src, R = w["HL"], B
    else:
        src, R = top, TB
    Z = w["Z"][:R]
    _matmul(src.ravel(), P[wout:], Z.ravel(), R, O, DH, (DH, 1), (1, DH), O)
    dims = (R, O, B, int(last), int(spec.loss == "mse"), int(bout), int(want_loss))
    _launch(_loss_kernel, _grid1(R), TPB,
            (Z, P, w["LEN"], w["YI"], w["YF"], w["DZ"], w["LROW"], dims))
    if not want_loss:
        return R
    DZ = w["DZ"][:R]
    _matmul(DZ.ravel(), src.ravel(), Gr[wout:], O, DH, R, (1, O), (DH, 1), DH)
    _launch(_colsum_kernel, _grid1(O), TPB, (DZ, Gr, (R, O, int(bout))))
    dtop = w["DL"][0][:TB * DH].reshape((TB, DH))
    if last:
        _matmul(DZ.ravel(), P[wout:], w["DHL"].ravel(), B, DH, O, (O, 1), (DH, 1), DH)
        _launch(_scatter_last_kernel, _grid1(TB * DH), TPB,
                (w["DHL"], w["LEN"], dtop, (T, B, DH)))
    else:
        _matmul(DZ.ravel(), P[wout:], dtop.ravel(), TB, DH, O, (O, 1), (DH, 1), DH)
    return R


def _backward(c, w, spec, T, B, tok, path, dl, *, want_dx, flow, sclip,
              dcs=None):
    """BPTT through all layers after _forward on the same workspace.
    dl: (T*B, D*H) gradient of the top layer's output; dL/dstate_n in
    w["DST"]; dcs: (T*B, D*H) device array of dL/dc_t of the top LSTM
    layer, or None. Fills c.G (core part), w["DST0"], w["FLOW2"] (if flow)
    and returns the input gradient's device view (or None)."""
    P, Gr = c.P, c.G
    H, D, L, GH = spec.H, spec.D, spec.L, spec.G * spec.H
    TB = T * B
    poff = param_offsets(spec)
    item = P.dtype.itemsize
    route, wsm = path
    lstm = spec.mode == "lstm"
    gru = spec.mode == "gru"
    if flow:
        w["FLOW2"].copy_to_device(np.zeros(T))
    dx = None
    nxt = 1
    no_dcs = cuda.to_device(np.zeros((1, 1), dtype=P.dtype))
    for k in range(L - 1, -1, -1):
        Ik = spec.I if k == 0 else D * H
        dck = dcs if (dcs is not None and lstm and k == L - 1) else no_dcs
        tokin = tok and k == 0
        dims = (T, B, H, D, _MODES[spec.mode], k, int(wsm), int(flow and k == L - 1),
                int(sclip is not None))
        ga = w["GA"][k] if (lstm or gru) else w["GA"][0]
        sc = 0.0 if sclip is None else float(sclip)
        if route == "persistent":
            shm = (2 * GH + 2 * H + (GH * H if wsm else 0)) * item
            _launch(_bwd_persistent_kernel, (B, D), _persist_threads(H),
                    (P, w["POFF"], w["SH"][k], ga, dl, w["LEN"], w["DST"],
                     w["DELTA"], w["DST0"], w["FLOW2"], dims, sc, dck, w["DELTAH"]),
                    shm)
        else:
            grid = ((H + STEP_NU - 1) // STEP_NU, (B + STEP_RB - 1) // STEP_RB, D)
            for s in range(T + 1):
                _launch(_bwd_step_kernel, grid, STEP_NU,
                        (P, w["POFF"], w["SH"][k], ga, dl, w["LEN"], w["DST"],
                         w["DELTA"], w["DHC"], w["DST0"], w["FLOW2"], dims, sc, s,
                         dck, w["DELTAH"]),
                        STEP_RB * STEP_KT * item)
        # dW_hh[d] = DELTA[d]^T @ h_prev rows (both directions in one launch;
        # the GRU's recurrent side: DELTAH)
        delta = w["DELTA"].ravel()
        sh = w["SH"][k].ravel()
        sh_d1 = (T + 2) * B * H + 2 * B * H    # reverse direction: h_prev at t+2
        w0 = poff[k * D, 1]
        wst = poff[k * D + 1, 1] - w0 if D == 2 else 0
        _matmul(w["DELTAH"].ravel() if gru else delta, sh, Gr[w0:], GH, H, TB,
                (1, GH), (H, 1), H, batch=D, bstrides=(TB * GH, sh_d1, wst))
        i0 = poff[k * D, 0]
        ist = poff[k * D + 1, 0] - i0 if D == 2 else 0
        if not tokin:
            xin = w["X"].ravel() if k == 0 else w["LOUT"][k - 1].ravel()
            _matmul(delta, xin, Gr[i0:], GH, Ik, TB, (1, GH), (Ik, 1), Ik, batch=D,
                    bstrides=(TB * GH, 0, ist))
        if tokin or spec.bias:
            _launch(_ih_bias_grad_kernel, (_grid1(GH), D), TPB,
                    (w["DELTA"], w["TOK"], w["POFF"], Gr,
                     (TB, GH, Ik, D, k, int(tokin), int(spec.bias))))
        if gru and spec.bias:   # bias_hh from the recurrent side
            for d in range(D):
                _launch(_colsum_kernel, _grid1(GH), TPB,
                        (w["DELTAH"][d], Gr, (TB, GH, int(poff[k * D + d, 3]))))
        if tokin or (k == 0 and not want_dx):
            continue
        # gradient of this layer's input: sum_d DELTA[d] @ W_ih[d]
        din = w["DL"][nxt][:TB * Ik]
        for d in range(D):
            _matmul(w["DELTA"][d].ravel(), P[poff[k * D + d, 0]:], din, TB, Ik, GH,
                    (GH, 1), (Ik, 1), Ik, accumulate=d > 0)
        if k > 0:
            dl = din.reshape((TB, Ik))
            nxt = 1 - nxt
        else:
            dx = din
    return dx


def core_forward(spec, flat, x, lengths, state0, ctx=None):
    """Returns out (T, B, D*H), state_n (S, L*D, B, H) as host arrays and a
    cache for core_backward (the workspace stays on the device)."""
    c = _ctx(ctx)
    w, T, B, tok = _inputs(c, spec, flat, x, lengths, state0)
    path = choose_path(spec, B, flat.dtype)
    _forward(c, w, spec, T, B, tok, path)
    out = w["LOUT"][spec.L - 1].copy_to_host().reshape(T, B, spec.D * spec.H)
    state_n = w["STN"].copy_to_host()
    return out, state_n, (c, c.key, T, B, tok, path)


def core_backward(spec, flat, cache, dout, dstate_n, state_clip=None, ctx=None,
                  dcs=None):
    """BPTT through the last core_forward. Returns dx (None for token ids),
    dstate0, grad (flat; core part), flow (T,) as host arrays. dcs: optional
    dL/dc_t of the top LSTM layer (T, B, D*H), host array."""
    c, key, T, B, tok, path = cache
    if c.key != key:
        raise RuntimeError("core_backward: the workspace of this forward call was "
                           "reused by another call")
    w = c.w
    c.P.copy_to_device(flat)
    DH = spec.D * spec.H
    dl = w["DL"][0][:T * B * DH].reshape((T * B, DH))
    _put(dl, dout, "dout")
    _put(w["DST"], dstate_n, "dstate_n")
    dcd = None
    if dcs is not None and spec.mode == "lstm":
        dcd = cuda.to_device(np.ascontiguousarray(dcs, dtype=flat.dtype)
                             .reshape(T * B, DH))
    dx = _backward(c, w, spec, T, B, tok, path, dl, want_dx=not tok, flow=True,
                   sclip=state_clip, dcs=dcd)
    grad = c.G.copy_to_host()
    grad[spec._n_core:] = 0
    dxh = None if dx is None else dx.copy_to_host().reshape(T, B, spec.I)
    flow = np.sqrt(w["FLOW2"].copy_to_host())
    return dxh, w["DST0"].copy_to_host(), grad, flow


def top_cells(spec, cache):
    """The top layer's cell states c_t of the LSTM forward that made `cache`:
    (T, B, D*H) host array laid out like `out`, zero at padding steps."""
    c, key, T, B, _, _ = cache
    if c.key != key:
        raise RuntimeError("top_cells: the workspace of this forward call was "
                           "reused by another call")
    SH = c.w["SH"][spec.L - 1][1].copy_to_host()        # (D, T+2, B, H)
    cs = np.ascontiguousarray(SH[:, 1:T + 1].transpose(1, 2, 0, 3)).reshape(
        T, B, spec.D * spec.H)
    lengths = c.w["LEN"].copy_to_host()
    cs[np.arange(T)[:, None] >= lengths[None, :]] = 0
    return cs


def model_forward(spec, flat, x, lengths, state0, ctx=None):
    """Read-out z ((T, B, O) or (B, O)) and state_n, as host arrays."""
    c = _ctx(ctx)
    w, T, B, tok = _inputs(c, spec, flat, x, lengths, state0)
    _forward(c, w, spec, T, B, tok, choose_path(spec, B, flat.dtype))
    R = _readout(c, w, spec, T, B, want_loss=False)
    z = w["Z"][:R].copy_to_host()
    if spec.readout == "all":
        z = z.reshape(T, B, spec.O)
    return z, w["STN"].copy_to_host()


def _targets(w, spec, y, T, B):
    R = B if spec.readout == "last" else T * B
    if spec.loss == "cross_entropy":
        dev = _is_device_array(y)
        if dev and not isinstance(y, DeviceSeq) and np.dtype(y.dtype) != np.int64:
            raise TypeError(f"y: class ids on the device must be int64, got {y.dtype}")
        # ids at padding steps are ignored: zeroed before the range check
        if _put(w["YI"][:R], y if dev else np.asarray(y, dtype=np.int64), "y",
                w["LEN"], mask=spec.readout == "all"):
            _check_range(w, w["YI"][:R], R, 0, spec.O, "y: class ids")
    else:
        _put(w["YF"][:R], y, "y", w["LEN"])


def _loss_and_grad(c, spec, flat, x, lengths, state0, y, *, flow, sclip, upload=True):
    w, T, B, tok = _inputs(c, spec, flat, x, lengths, state0, upload)
    _targets(w, spec, y, T, B)
    path = choose_path(spec, B, flat.dtype)
    _forward(c, w, spec, T, B, tok, path)
    R = _readout(c, w, spec, T, B, want_loss=True)
    DH = spec.D * spec.H
    w["DST"].copy_to_device(np.zeros(w["DST"].shape, dtype=flat.dtype))
    dl = w["DL"][0][:T * B * DH].reshape((T * B, DH))
    _backward(c, w, spec, T, B, tok, path, dl, want_dx=False, flow=flow, sclip=sclip)
    return w, T, B, R


def _sync_params(c, flat, opt_state, nmom):
    """Make the device copies of the parameters (and, when the optimizer has
    moments, of opt_state) current before a step. Returns whether the user
    holds views of the host arrays (then they must be copied back after)."""
    ef = _mirror.entry(flat)
    eo = _mirror.entry(opt_state) if nmom else None
    for e in (ef, eo):   # newer copies held elsewhere (another TrainStep)
        if e is not None and e.holder is not None and e.holder is not c:
            e.holder.pull()
    viewed = _mirror.exported(flat) or (nmom and _mirror.exported(opt_state))
    cur = (ef, ef.version, eo, eo.version if eo is not None else None)
    elsewhere = c.held is not None and c.held[0]() is not flat
    if viewed or c.cur != cur or elsewhere:
        c.pull()
        c.P.copy_to_device(flat)
        if nmom:
            c.M.copy_to_device(np.ascontiguousarray(opt_state))
        # views may write the host arrays at any time, unseen: never current
        c.cur = None if viewed else cur
    return viewed


def train_step(spec, flat, opt_state, step, x, lengths, state0, y, *, opt,
               hyper, clip, limit, state_clip, ctx=None):
    """One training step on the device. The parameters (flat) and optimizer
    moments (opt_state) stay on the device afterwards: this ctx becomes their
    holder in fastrnn/_mirror.py and copies them back when the host asks
    (``_Ctx.pull``), or at once while the user holds views of them.
    Returns dict(loss, grad_norm, clipped, skipped, state_n (host),
    grad (a device array: copy_to_host() on demand))."""
    c = _ctx(ctx)
    T, B = int(x.shape[0]), int(x.shape[1])
    tok = np.dtype(x.dtype).kind in "iu"
    _prepare(c, spec, flat.dtype, T, B, tok)
    n = flat.shape[0]
    if c.M is None:
        c.M = cuda.device_array((2, n), dtype=flat.dtype)
    nmom = _nmom(opt, hyper)
    viewed = _sync_params(c, flat, opt_state, nmom)
    w, T, B, R = _loss_and_grad(c, spec, flat, x, lengths, state0, y, flow=False,
                                sclip=state_clip, upload=False)
    res = _clip_update(c, flat, opt_state, step, w, R, B, nmom, viewed, opt=opt,
                       hyper=hyper, clip=clip, limit=limit)
    return dict(loss=float(res[0]), grad_norm=float(res[1]), clipped=bool(res[2]),
                skipped=bool(res[3]), state_n=w["STN"].copy_to_host(), grad=c.G)


def _nmom(opt, hyper):
    """How many moment rows the optimizer uses: SGD with momentum and Adagrad
    one, Adam two, plain SGD none."""
    return {0: 1 if hyper.get("momentum", 0.0) else 0, 1: 2, 2: 1}[_OPTS[opt]]


def _clip_update(c, flat, opt_state, step, w, R, B, nmom, viewed, *, opt, hyper,
                 clip, limit):
    """Norm, guard, clipping and the update of c.P/c.M from the gradient in
    c.G and the per-row losses w["LROW"][:R] (loss = their sum / B); then
    this ctx holds the newer parameters (see train_step). Returns RES on the
    host: (loss, grad_norm, clipped, skipped, ...)."""
    n = flat.shape[0]
    kind = _OPTS[opt]
    Gr = c.G
    lim = 0.0 if limit is None else float(limit)
    nblk = max(1, min(NRED, w["PART"].shape[0], (n + TPB - 1) // TPB))
    _launch(_sumsq_kernel, nblk, TPB, (Gr, w["PART"], lim), 2 * TPB * 8)
    _launch(_finalize_kernel, 1, TPB,
            (w["PART"], w["LROW"], w["RES"], (nblk, R, B, _CLIPS[clip]), lim), 3 * TPB * 8)
    b1, b2 = hyper.get("beta1", 0.0), hyper.get("beta2", 0.0)
    hyp = (float(hyper["lr"]), float(hyper.get("momentum", 0.0)), float(b1), float(b2),
           float(hyper.get("eps", 0.0)), lim,
           float(hyper["lr"]) / (1 - b1 ** step) if kind == 1 else 0.0,
           math.sqrt(1 - b2 ** step) if kind == 1 else 1.0,
           _finite_bound(flat.dtype))
    args = (c.P, Gr, c.M, w["RES"], (kind, _CLIPS[clip]), hyp)
    _launch(_update_check_kernel, _grid1(n), TPB, args)   # then all or nothing
    _launch(_update_kernel, _grid1(n), TPB, args)
    res = w["RES"].copy_to_host()
    skipped = bool(res[3])
    if skipped:
        res[2] = 0.0   # a skipped step clipped nothing
    else:
        c.held = (weakref.ref(flat), weakref.ref(opt_state) if nmom else None)
        if viewed:
            c.pull()
        else:
            _mirror.hold(flat, c)
            if nmom:
                _mirror.hold(opt_state, c)
    return res


def train_grad(spec, flat, x, lengths, state0, y, *, state_clip, ctx=None):
    """Forward, loss and BPTT on the device; the gradient and the final
    state are copied to the host (the caller sums the gradients of all
    ranks there)."""
    c = _ctx(ctx)
    T, B = int(x.shape[0]), int(x.shape[1])
    _prepare(c, spec, flat.dtype, T, B, np.dtype(x.dtype).kind in "iu")
    _sync_params(c, flat, None, 0)
    w, T, B, R = _loss_and_grad(c, spec, flat, x, lengths, state0, y, flow=False,
                                sclip=state_clip, upload=False)
    loss = float(np.sum(w["LROW"][:R].copy_to_host())) / B
    return dict(loss=loss, grad=c.G.copy_to_host(), state_n=w["STN"].copy_to_host())


def apply_update(spec, flat, opt_state, step, grad, loss, *, opt, hyper, clip,
                 limit, ctx=None):
    """Upload grad (host) and run train_step's clipping and update kernels
    on it, with loss standing in for the per-row losses; grad receives the
    clipped gradient."""
    c = _ctx(ctx)
    if c.pkey != (spec, np.dtype(flat.dtype)):
        _prepare(c, spec, flat.dtype, 1, 1, False)
    if c.M is None:
        c.M = cuda.device_array((2, flat.shape[0]), dtype=flat.dtype)
    nmom = _nmom(opt, hyper)
    viewed = _sync_params(c, flat, opt_state, nmom)
    c.G.copy_to_device(np.ascontiguousarray(grad))
    f8 = np.float64
    w = dict(PART=_alloc((NRED, 2), f8), RES=_alloc((8,), f8),
             LROW=cuda.to_device(np.array([loss], dtype=f8)))
    res = _clip_update(c, flat, opt_state, step, w, 1, 1, nmom, viewed, opt=opt,
                       hyper=hyper, clip=clip, limit=limit)
    c.G.copy_to_host(grad)
    return dict(grad_norm=float(res[1]), clipped=bool(res[2]), skipped=bool(res[3]),
                grad=grad)


def gradient_flow(spec, flat, x, lengths, state0, y, ctx=None):
    """(T,) norm of dL/dh_t of the top layer per step."""
    w, T, B, R = _loss_and_grad(_ctx(ctx), spec, flat, x, lengths, state0, y,
                                flow=True, sclip=None)
    return np.sqrt(w["FLOW2"].copy_to_host())
