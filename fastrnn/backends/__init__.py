"""Backend registry.

Every backend module implements the same functions with the same arguments:

    available() -> (bool, reason)
    core_forward(spec, flat, x, lengths, state0, ctx=None) -> out, state_n, cache
    core_backward(spec, flat, cache, dout, dstate_n, state_clip=None, ctx=None,
                  dcs=None) -> dx, dstate0, grad, flow
        (dcs: optional dL/dc_t of the LSTM's top layer, laid out like dout)
    top_cells(spec, cache) -> (T, B, D*H): the LSTM top layer's c_t
    model_forward(spec, flat, x, lengths, state0, ctx=None) -> z, state_n
    train_step(spec, flat, opt_state, step, x, lengths, state0, y, *, opt,
               hyper, clip, limit, state_clip, ctx=None) -> dict
    gradient_flow(spec, flat, x, lengths, state0, y, ctx=None) -> flow (T,)
    train_grad(spec, flat, x, lengths, state0, y, *, state_clip, ctx=None)
        -> dict(loss, grad, state_n)
    apply_update(spec, flat, opt_state, step, grad, loss, *, opt, hyper,
                 clip, limit, ctx=None) -> dict(grad_norm, clipped, skipped, grad)

train_grad and apply_update are train_step cut in two where data-parallel
training (fastrnn/_dist.py) sums the gradients of all ranks: train_grad is
forward, loss and BPTT and changes nothing (grad is a host array of flat's
dtype and length, possibly the backend's workspace: valid until the next
call with the same ctx); apply_update is the norm of grad, the non-finite
guard on loss and norm, clipping (grad is clipped in place) and the update,
with the same compiled code as train_step. train_step equals train_grad
followed by apply_update on the same ctx.

train_step updates flat and opt_state in place, or -- a backend that keeps
them on a device (cuda) -- registers itself as the holder of newer copies
with fastrnn/_mirror.py, which the parameter and moment buffers
(fastrnn/_params.py, owned by the layers, the model and the TrainStep)
consult before any host access. A backend with ``DEVICE_INPUTS = True`` receives device arrays
from the layers as _validate.DeviceSeq (validated shape, read in place).

The layers pick one by name; nothing outside this package knows how a kernel
works. A new cell may reach the backends one at a time: ``_LACKS`` lists
the cell modes a backend does not implement (none at present); asking such
a backend for that cell raises RuntimeError, and "auto" resolves to the
first backend that has it. Modules are imported lazily so that a missing
optional dependency (numba, the C extension, numba-cuda) only disables its
backend.
"""
import importlib

NAMES = ("numpy", "numba", "c", "cuda")
_MODULES = {"numpy": ".reference", "numba": ".numba_cpu", "c": ".c",
            "cuda": ".cuda"}
_cache = {}
# cell modes a backend does not implement yet
_LACKS = {}


def _load(name):
    if name not in _cache:
        try:
            mod = importlib.import_module(_MODULES[name], __name__)
            ok, why = mod.available()
        except Exception as e:  # ImportError, missing extension, no driver
            mod, ok, why = None, False, f"{type(e).__name__}: {e}"
        _cache[name] = (mod if ok else None, ok, why)
    return _cache[name]


def available_backends():
    """{name: (available, reason)} for every backend."""
    return {n: (_load(n)[1], _load(n)[2]) for n in NAMES}


def supports(name, mode):
    """Whether backend `name` implements cell mode `mode` ("gru", "lstm", ...)."""
    return mode not in _LACKS.get(name, ())


def resolve(name, mode=None):
    """Backend name after resolving "auto"; checks availability and, when
    `mode` is given, that the backend implements that cell."""
    if not isinstance(name, str) or name not in NAMES + ("auto",):
        raise ValueError(f"backend: expected one of {NAMES + ('auto',)}, "
                         f"got {name!r}")
    if name == "auto":
        for n in ("numba", "c", "numpy"):
            if _load(n)[1] and (mode is None or supports(n, mode)):
                return n
    if mode is not None and not supports(name, mode):
        have = [n for n in NAMES if supports(n, mode)]
        raise RuntimeError(f"backend {name!r} does not implement the "
                           f"{mode.upper()} cell yet; backends that do: {have}")
    mod, ok, why = _load(name)
    if not ok:
        raise RuntimeError(f"backend {name!r} is not available: {why}")
    return name


def ctx_state(ctx, name, factory):
    """The state backend `name` keeps between calls in the caller's `ctx`
    dict (workspaces, device buffers), made by `factory` on first use; a
    fresh, unkept one when the caller passes no ctx."""
    if ctx is None:
        return factory()
    state = ctx.get(name)
    if state is None:
        state = ctx[name] = factory()
    return state


def get(name):
    """The backend module for a resolved name."""
    return _load(resolve(name))[0]
