"""GPU training-step benchmark: fastrnn's "cuda" backend against PyTorch's
cuDNN RNNs (torch.nn.RNN / torch.nn.LSTM on a CUDA device).

    python benchmarks/gpu_bench.py           # the whole grid; writes
                                             # benchmarks/results/gpu_<gpu>.json
    python benchmarks/gpu_bench.py --cells lstm --batches 1,4 --hiddens 128,256
    python benchmarks/gpu_bench.py --check-only          # verify, time nothing
    python benchmarks/gpu_bench.py --path step           # force a kernel path

Setting (as benchmarks/test_bench_train.py, on the GPU): one training step =
forward over T steps, cross-entropy at every step (sum over time, mean over
the batch), BPTT, SGD update (lr 0.01); float32; T=100, I=32, O=10; cells
"rnn" (tanh) and "lstm"; B in {1, 4, 16, 64} x H in {128, 256, 512, 1024}.
PyTorch: zero_grad, forward, loss, backward, step, loss.item(), inputs
already on the GPU, TF32 off (cuDNN and matmul: the same float32 arithmetic
fastrnn does; --tf32 allows it). fastrnn: ``fr.TrainStep`` (the public API) on
x and y already on the GPU (numba device arrays, read in place); parameters
and moments stay on the device between steps, the step returns the loss
(so each step waits for the GPU, as torch's loss.item() does).

Before anything is timed, both implementations make one step on a fresh
copy, from the same weights and data as the reference (fastrnn's NumPy
backend; ``--reference numba`` is faster on big shapes), and must match it:
loss and updated parameters rtol 1e-4, parameter updates (new - old, i.e.
-lr * gradient) rtol 1e-3, each with an absolute floor of rtol * max|ref|.
A point that fails its check is reported and not timed (exit status 1).

Timing: ``--warmup`` steps (numba compiles its kernels on the first call,
cuDNN picks algorithms), then ``--steps`` steps, each timed on its own with
the device synchronised before and after; the median and the minimum are
recorded. The JSON file holds the GPU, the versions, the settings and for
each point both times, the ratio (torch / fastrnn: > 1 means fastrnn is
faster) and the recurrence path fastrnn took (fastrnn/backends/cuda.py).
A markdown table of the ratios is printed (and written with --table). A
later run into the same file (same GPU and settings) merges into it: the
points it measures replace their old entries, the rest stay (--fresh
overwrites), so the grid can be run in parts, e.g. --cells rnn, then
--cells lstm. On big shapes the NumPy reference is slow (seconds per point
at B=64, H=1024); ``--reference numba`` checks against the numba backend,
itself tested against the NumPy reference.

Targets (issue 6): ratio >= 1.0 at B <= 8 and H <= 512; >= 0.5 elsewhere.
"""
import argparse
import datetime
import importlib.util
import json
import os
import platform
import re
import statistics
import sys
import time

import numpy as np

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if importlib.util.find_spec("fastrnn") is None:   # a checkout, not installed
    sys.path.insert(0, _ROOT)

import fastrnn as fr  # noqa: E402

T, I, O = 100, 32, 10
LR = 0.01
DTYPE = np.float32
CELLS = ("rnn", "lstm")
BATCHES = (1, 4, 16, 64)
HIDDENS = (128, 256, 512, 1024)
RTOL, UPDATE_RTOL = 1e-4, 1e-3
RESULTS_DIR = os.path.join(_ROOT, "benchmarks", "results")


# --------------------------------------------------------------------------
# pieces that need no GPU (tested in tests/test_cuda.py)
# --------------------------------------------------------------------------
def slug(name):
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", str(name).lower()).strip("-") or "unknown"


def results_path(gpu_name, directory=RESULTS_DIR):
    return os.path.join(directory, f"gpu_{slug(gpu_name)}.json")


def meets_target(B, H, ratio):
    """Issue 6's targets: >= 1.0x cuDNN at B <= 8 and H <= 512, >= 0.5x
    (within 2x) elsewhere."""
    return ratio >= (1.0 if (B <= 8 and H <= 512) else 0.5)


def ratio_table(results):
    """Markdown: per cell type a table B x H of torch_ms / fastrnn_ms."""
    lines = []
    for cell in sorted({r["cell"] for r in results}, key=CELLS.index):
        rows = [r for r in results if r["cell"] == cell]
        Bs = sorted({r["B"] for r in rows})
        Hs = sorted({r["H"] for r in rows})
        by = {(r["B"], r["H"]): r for r in rows}
        name = {"rnn": "RNN (tanh)", "lstm": "LSTM"}[cell]
        lines += [f"**{name}**: speed-up over cuDNN, torch ms / fastrnn ms "
                  "(> 1: fastrnn faster); median ms per training step in brackets",
                  "", "| B \\ H | " + " | ".join(str(H) for H in Hs) + " |",
                  "|---" * (len(Hs) + 1) + "|"]
        met = total = 0
        for B in Bs:
            cells = []
            for H in Hs:
                r = by.get((B, H))
                if r is None:
                    cells.append("")
                elif r.get("ratio") is None:
                    cells.append(r.get("status", "not timed"))
                else:
                    ok = meets_target(B, H, r["ratio"])
                    met += ok
                    total += 1
                    cells.append(f"{r['ratio']:.3g}{'' if ok else ' (!)'} "
                                 f"({r['fastrnn_ms']:.3g} / {r['torch_ms']:.3g})")
            lines.append(f"| {B} | " + " | ".join(cells) + " |")
        lines += ["", f"Targets met: {met}/{total} ((!) marks a miss: >= 1.0 at "
                  "B <= 8 and H <= 512, >= 0.5 elsewhere).", ""]
    return "\n".join(lines)


SAME_SETTINGS = ("I", "O", "dtype", "optimizer", "loss", "readout", "path",
                 "reference", "tf32", "torch_device")


def merge(old_doc, new_doc):
    """new_doc's results plus those of old_doc (an earlier run into the same
    file) that were not measured again; only if both runs used the same
    settings (SAME_SETTINGS) on the same GPU, else just new_doc's."""
    new = list(new_doc["results"])
    if not old_doc or old_doc.get("gpu") != new_doc["gpu"] or any(
            old_doc.get("settings", {}).get(k) != new_doc["settings"][k]
            for k in SAME_SETTINGS):
        return new
    key = lambda r: (r["cell"], r["B"], r["H"], r["T"])  # noqa: E731
    fresh = {key(r) for r in new}
    kept = [r for r in old_doc.get("results", []) if key(r) not in fresh]
    order = {c: i for i, c in enumerate(CELLS)}
    return sorted(kept + new, key=lambda r: (order.get(r["cell"], 9), r["B"], r["H"], r["T"]))


def _load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _copy_state(state):
    return {k: np.array(v, copy=True) for k, v in state.items()}


def _close(actual, expected, rtol):
    """(|actual - expected| <= rtol * (max|expected| + |expected|) everywhere,
    max|actual - expected| / max|expected|); NaN never passes."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    scale = max(float(np.max(np.abs(expected))), 1e-30)
    diff = np.abs(actual - expected)
    return bool(np.all(diff <= rtol * (scale + np.abs(expected)))), float(np.max(diff)) / scale


def check(loss, w1, ref):
    """Compare one step (loss, updated parameters) with the reference's.
    Returns (ok, details)."""
    ref_loss, w0, ref_w1 = ref["loss"], ref["w0"], ref["w1"]
    details = {"ref_loss": ref_loss, "loss": float(loss)}
    ok, err = _close(loss, ref_loss, RTOL)
    details["loss_rel_err"] = err
    worst = 0.0
    if set(w1) != set(ref_w1):
        return False, dict(details, error=f"parameter names {sorted(w1)}")
    for k in ref_w1:
        ok_p, _ = _close(w1[k], ref_w1[k], RTOL)
        ok_u, err_u = _close(w1[k].astype(np.float64) - w0[k],
                             ref_w1[k].astype(np.float64) - w0[k], UPDATE_RTOL)
        worst = max(worst, err_u)
        if not (ok_p and ok_u):
            ok = False
            details.setdefault("failed", []).append(k)
    details["max_update_rel_err"] = worst
    return bool(ok and np.isfinite(loss)), details


# --------------------------------------------------------------------------
# the two implementations
# --------------------------------------------------------------------------
def data(B, T_):
    rng = np.random.default_rng(1000 + B)
    return (rng.standard_normal((T_, B, I)).astype(DTYPE),
            rng.integers(0, O, size=(T_, B)).astype(np.int64))


def fr_model(cell, H, backend, state=None):
    if cell == "rnn":
        core = fr.RNN(I, H, nonlinearity="tanh", dtype=DTYPE, seed=0, backend=backend)
    else:
        core = fr.LSTM(I, H, dtype=DTYPE, seed=0, backend=backend)
    model = fr.SequenceModel(core, O)
    if state is not None:
        model.load_state_dict(state)
    return model


def reference_step(cell, B, H, T_, backend):
    x, y = data(B, T_)
    model = fr_model(cell, H, backend)
    w0 = _copy_state(model.state_dict())
    res = fr.TrainStep(model, fr.SGD(LR))(x, y)
    return {"x": x, "y": y, "w0": w0, "loss": float(res.loss),
            "w1": _copy_state(model.state_dict())}


def make_fastrnn(cell, H, ref):
    model = fr_model(cell, H, "cuda", ref["w0"])
    step = fr.TrainStep(model, fr.SGD(LR))
    from numba import cuda
    # inputs already on the device, as torch's are: the step reads them in place
    x, y = cuda.to_device(np.array(ref["x"])), cuda.to_device(np.array(ref["y"]))

    def run():
        loss = step(x, y).loss
        cuda.synchronize()
        return loss

    return run, lambda: _copy_state(model.state_dict())


def make_torch(cell, H, ref, device, tf32):
    import torch

    from fastrnn._torch_ref import TorchTrainStep
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    step = TorchTrainStep(cell, I, H, O, ref["w0"], nonlinearity="tanh",
                          dtype=DTYPE, device=device, optimizer="sgd", lr=LR)
    xt, yt = step.tensors(ref["x"], ref["y"])
    sync = torch.cuda.synchronize if step.device.type == "cuda" else (lambda: None)

    def run():
        value = step(xt, yt)
        sync()
        return value

    return run, step.state_dict


def time_steps(run, warmup, steps):
    for _ in range(warmup):
        run()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        run()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), min(times)


# --------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------
def _ints(s):
    return tuple(int(v) for v in s.split(",") if v.strip())


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cells", default=",".join(CELLS))
    p.add_argument("--batches", type=_ints, default=BATCHES)
    p.add_argument("--hiddens", type=_ints, default=HIDDENS)
    p.add_argument("--T", type=int, default=T, help="sequence length (default 100)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per point")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--path", choices=("auto", "persistent", "step"), default="auto",
                   help="fastrnn's recurrence path (default: its own choice)")
    p.add_argument("--reference", choices=("numpy", "numba"), default="numpy",
                   help="backend whose step the others must match")
    p.add_argument("--torch-device", default="cuda",
                   help="'cuda' (default); 'cpu' only to test this script")
    p.add_argument("--tf32", action="store_true", help="let cuDNN/cuBLAS use TF32")
    p.add_argument("--check-only", action="store_true", help="check, time nothing")
    p.add_argument("--out", help="JSON file (default benchmarks/results/gpu_<gpu>.json)")
    p.add_argument("--fresh", action="store_true",
                   help="overwrite the JSON file instead of merging into it (a point "
                        "measured again replaces its old entry; the rest are kept)")
    p.add_argument("--table", help="also write the markdown table to this file")
    a = p.parse_args(argv)
    a.cells = tuple(c.strip() for c in a.cells.split(",") if c.strip())
    if set(a.cells) - set(CELLS):
        p.error(f"--cells: expected some of {CELLS}, got {a.cells}")
    return a


def _versions():
    v = {"fastrnn": getattr(fr, "__version__", "?"), "numpy": np.__version__,
         "python": platform.python_version()}
    for mod, dist in (("numba", "numba"), ("numba_cuda", "numba-cuda"), ("torch", "torch")):
        try:
            import importlib.metadata
            v[mod] = importlib.metadata.version(dist)
        except Exception:
            pass
    try:
        import torch
        v["cudnn"] = torch.backends.cudnn.version()
        v["torch_cuda"] = torch.version.cuda
    except Exception:
        pass
    return v


def main(argv=None):
    a = parse_args(argv)
    ok, why = fr.available_backends()["cuda"]
    if not ok:
        sys.exit(f"fastrnn's cuda backend is not available: {why}")
    from fastrnn.backends import cuda as cb
    cb.configure(PATH=a.path)
    gpu = cb.device_name()
    if cb.SIM:
        print("warning: running under the CUDA simulator: timings mean nothing",
              file=sys.stderr)
    try:
        import torch  # noqa: F401
    except ImportError:
        sys.exit("PyTorch is needed for the comparison (a CUDA build of torch)")
    out = a.out or results_path(gpu)
    results, failed = [], False
    for cell in a.cells:
        for B in a.batches:
            for H in a.hiddens:
                spec = fr_model(cell, H, "numpy")._spec
                route, wsm = cb.choose_path(spec, B, DTYPE)
                r = {"cell": cell, "B": B, "H": H, "T": a.T,
                     "path": route + ("" if route == "step" else
                                      (" (W_hh in shared memory)" if wsm else
                                       " (W_hh in global memory)"))}
                ref = reference_step(cell, B, H, a.T, a.reference)
                checks = {}
                for impl, make in (("fastrnn", lambda: make_fastrnn(cell, H, ref)),
                                   ("torch", lambda: make_torch(cell, H, ref,
                                                                a.torch_device, a.tf32))):
                    run, state = make()
                    passed, details = check(run(), state(), ref)
                    checks[impl] = dict(details, passed=passed)
                r["check"] = checks
                label = f"{cell} B={B} H={H}"
                if not all(c["passed"] for c in checks.values()):
                    failed = True
                    r["status"] = "check failed"
                    print(f"{label}: CHECK FAILED {json.dumps(checks)}", file=sys.stderr)
                elif not a.check_only:
                    run_f, _ = make_fastrnn(cell, H, ref)
                    run_t, _ = make_torch(cell, H, ref, a.torch_device, a.tf32)
                    r["fastrnn_ms"], r["fastrnn_min_ms"] = time_steps(run_f, a.warmup, a.steps)
                    r["torch_ms"], r["torch_min_ms"] = time_steps(run_t, a.warmup, a.steps)
                    r["ratio"] = r["torch_ms"] / r["fastrnn_ms"]
                    print(f"{label}: fastrnn {r['fastrnn_ms']:.3f} ms ({r['path']}), "
                          f"torch {r['torch_ms']:.3f} ms, ratio {r['ratio']:.2f}",
                          flush=True)
                else:
                    r["status"] = "checked"
                    print(f"{label}: check passed ({r['path']})", flush=True)
                results.append(r)
    doc = {"gpu": gpu, "date": datetime.datetime.now().isoformat(timespec="seconds"),
           "simulator": bool(cb.SIM), "versions": _versions(),
           "settings": {"T": a.T, "I": I, "O": O, "dtype": np.dtype(DTYPE).name,
                        "optimizer": f"SGD(lr={LR})", "loss": "cross_entropy",
                        "readout": "all", "steps": a.steps, "warmup": a.warmup,
                        "path": a.path, "reference": a.reference, "tf32": a.tf32,
                        "torch_device": a.torch_device},
           "results": results}
    doc["results"] = results = merge(None if a.fresh else _load(out), doc)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(doc, f, indent=1)
    table = ratio_table(results)
    header = (f"GPU: {gpu}; T={a.T}, I={I}, O={O}, float32, SGD; "
              f"{datetime.date.today().isoformat()}\n\n")
    print("\n" + header + table)
    if a.table:
        with open(a.table, "w") as f:
            f.write(header + table)
    print(f"results: {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
