"""Measured plans of the numba backend: which strategy runs a shape fastest
on this machine, timed the first time the shape is used and kept on disk.

A shape class is (cell, dtype, B, H, I, layers, directions, token ids, T
rounded up to a power of 2); the read-out only scales the work. For each
class the backend times its strategies (numba_cpu.plan_candidates: the
per-step products on its own loops, on its register-tiled kernel or on
MKL when installed, the batch chunks run on all of numba's threads or on
one) on a short synthetic training step and keeps the fastest
(like FFTW's wisdom or cuDNN's benchmark mode). Every strategy computes the
same step (tests/test_plan.py checks each against the reference); the
choice of MKL or of the tiled kernel changes float rounding, the choice
of threads never does.

The plan file `fastrnn-plan-<machine>.json` lives beside Numba's cache of the
kernels (NUMBA_CACHE_DIR when set, else the backend's __pycache__; a user
cache directory when that is not writable; FASTRNN_PLAN_DIR overrides). It
is keyed by the CPU model and flags, the core count and the versions of
fastrnn, numba, llvmlite, numpy and MKL: a file made under another key
(another CPU, an upgrade) or one that does not parse is ignored with a
warning and replaced. FASTRNN_PLAN=off uses the fixed safe default (own
loops, all threads) and touches no file.
"""
import hashlib
import json
import os
import platform
import tempfile
import threading
import warnings

FORMAT = 1
_lock = threading.RLock()


def enabled():
    """False when FASTRNN_PLAN is off/0/no/false."""
    v = os.environ.get("FASTRNN_PLAN", "").strip().lower()
    return v not in ("off", "0", "no", "false")


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            model = flags = ""
            for line in f:
                if line.startswith("model name") and not model:
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = line.split(":", 1)[1].strip()
            vec = [v for v in ("avx512f", "avx2", "fma", "neon") if v in flags.split()]
            return model, vec
    except OSError:
        return platform.processor() or platform.machine(), []


def machine_key(mkl_version=""):
    """What a plan is valid for: CPU model and vector flags, cores, library
    versions."""
    import llvmlite
    import numba
    import numpy
    from .. import __version__
    model, vec = _cpu_model()
    return {"format": FORMAT, "cpu": model, "vector": vec,
            "cores": os.cpu_count(), "fastrnn": __version__,
            "numba": numba.__version__, "llvmlite": llvmlite.__version__,
            "numpy": numpy.__version__, "mkl": mkl_version}


def _numba_cache_dir():
    d = os.environ.get("NUMBA_CACHE_DIR")
    if d:
        return d
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "__pycache__")


def plan_dir():
    """Where the plan file lives (created if needed)."""
    d = os.environ.get("FASTRNN_PLAN_DIR")
    cands = [d] if d else [_numba_cache_dir(),
                           os.path.join(os.path.expanduser("~"), ".cache", "fastrnn")]
    for c in cands:
        try:
            os.makedirs(c, exist_ok=True)
            if os.access(c, os.W_OK):
                return c
        except OSError:
            continue
    return cands[-1]


class Plan:
    """The choices for one machine key, loaded from and saved to `path`."""

    def __init__(self, key, path=None):
        self.key = key
        digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
        self.path = path or os.path.join(plan_dir(), f"fastrnn-plan-{digest}.json")
        self.entries = {}
        self._load()

    def _load(self):
        try:
            with open(self.path) as f:
                data = json.load(f)
        except FileNotFoundError:
            return
        except (OSError, ValueError) as e:
            warnings.warn(f"fastrnn: ignoring the unreadable plan file {self.path} "
                          f"({type(e).__name__}: {e}); shapes are planned again",
                          RuntimeWarning, stacklevel=3)
            return
        if not isinstance(data, dict) or not isinstance(data.get("entries"), dict):
            warnings.warn(f"fastrnn: ignoring the malformed plan file {self.path}",
                          RuntimeWarning, stacklevel=3)
            return
        if data.get("key") != self.key:
            warnings.warn(f"fastrnn: ignoring the plan file {self.path}: made for "
                          f"{data.get('key')!r}, this machine is {self.key!r}",
                          RuntimeWarning, stacklevel=3)
            return
        self.entries = {k: v for k, v in data["entries"].items()
                        if isinstance(v, dict)}

    def get(self, shape):
        with _lock:
            return self.entries.get(shape)

    def put(self, shape, entry):
        """Record and save (atomically: a temporary file renamed over)."""
        with _lock:
            self.entries[shape] = entry
            data = {"key": self.key, "entries": self.entries}
            d = os.path.dirname(self.path)
            try:
                os.makedirs(d, exist_ok=True)
                fd, tmp = tempfile.mkstemp(dir=d, prefix=".fastrnn-plan.", suffix=".tmp")
                with os.fdopen(fd, "w") as f:
                    json.dump(data, f, indent=1, sort_keys=True)
                os.chmod(tmp, 0o644)
                os.replace(tmp, self.path)
            except OSError as e:
                warnings.warn(f"fastrnn: cannot save the plan to {self.path}: {e} "
                              "(kept in memory for this process)",
                              RuntimeWarning, stacklevel=3)


_plans = {}


def get_plan(mkl_version=""):
    """The process's Plan for this machine (loaded once)."""
    with _lock:
        key = machine_key(mkl_version)
        k = json.dumps(key, sort_keys=True)
        if k not in _plans:
            _plans[k] = Plan(key)
        return _plans[k]


def reset():
    """Forget the loaded plans (tests; the next use reloads from disk)."""
    with _lock:
        _plans.clear()


# ---------------------------------------------------------------------------
# `fastrnn tune`: plan the benchmark grid ahead of time
# ---------------------------------------------------------------------------
def add_tune_parser(sub, formatter_class=None):
    """Register `fastrnn tune` on the CLI's subparsers."""
    t = sub.add_parser(
        "tune", help="plan the numba backend's strategies for a grid of shapes "
        "now (compiling its kernels) and print the choices",
        formatter_class=formatter_class)
    t.add_argument("--cells", default="rnn,lstm,gru",
                   help="comma-separated: rnn, lstm, gru (default: the benchmark "
                   "grid's, all three)")
    t.add_argument("--batches", default="1,16,64", help="comma-separated batch sizes")
    t.add_argument("--hiddens", default="32,128,512", help="comma-separated hidden sizes")
    t.add_argument("--input-size", type=int, default=32)
    t.add_argument("--steps", type=int, default=100, help="sequence length T")
    t.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    t.add_argument("--replan", action="store_true",
                   help="measure again the shapes the plan already holds")
    t.set_defaults(func=cmd_tune)
    return t


def _ints(text, name):
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        vals = []
    if not vals or min(vals) < 1:
        raise SystemExit(f"fastrnn tune: error: --{name}: expected positive "
                         f"integers separated by commas, got {text!r}")
    return vals


def cmd_tune(args):
    cells = [c.strip() for c in args.cells.split(",") if c.strip()]
    bad = [c for c in cells if c not in ("rnn", "lstm", "gru")]
    if bad or not cells:
        raise SystemExit(f"fastrnn tune: error: --cells: expected some of rnn, "
                         f"lstm, gru, got {args.cells!r}")
    batches = _ints(args.batches, "batches")
    hiddens = _ints(args.hiddens, "hiddens")
    if args.input_size < 1 or args.steps < 1:
        raise SystemExit("fastrnn tune: error: --input-size and --steps: "
                         "expected >= 1")
    if not enabled():
        print("FASTRNN_PLAN is off: the numba backend uses its fixed default "
              "(built-in loops, all threads); nothing to plan.")
        return 0
    from . import numba_cpu as nb
    rows = nb.tune(cells, batches, hiddens, args.input_size, args.dtype,
                   replan=args.replan, T=args.steps)
    print(f"plan: {get_plan(nb._plan_version()).path}")
    print(f"{'cell':5s} {'B':>4s} {'H':>5s}  {'per-step products':22s} "
          f"{'threads':8s} {'ms (T=' + str(nb.PLAN_T) + ')':>12s}")
    for r in rows:
        print(f"{r['cell']:5s} {r['B']:4d} {r['H']:5d}  {r['products']:22s} "
              f"{r['threads']:8s} {r['ms']:12.3f}")
    return 0
