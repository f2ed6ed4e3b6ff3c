"""`fastrnn bench`: a quick speed table -- one training step on each available
backend, the NumPy reference and PyTorch (when installed), from the same
parameters, each step's loss checked against the reference's.
"""
import argparse
import json
import os
import time

import numpy as np

from .options import Formatter


BENCH_SHAPES = [(100, 32, 8, 32), (50, 32, 64, 128)]   # (T, B, I, H)


def _parse_shape(s):
    try:
        T, B, I, H = (int(v) for v in s.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected T,B,I,H (four integers), got {s!r}")
    if min(T, B, I, H) < 1:
        raise argparse.ArgumentTypeError(f"expected positive sizes, got {s!r}")
    return T, B, I, H


def _time(fn, seconds, min_reps=3, max_reps=1000):
    """Median seconds per call of fn after one warm-up call (compilation,
    caches, workspaces), measured for about `seconds`; also the warm-up's result."""
    first = fn()
    times = []
    t_end = time.perf_counter() + seconds
    while len(times) < min_reps or (time.perf_counter() < t_end and len(times) < max_reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times)), len(times), first


def _bench_case(cell, T, B, I, H, seconds, names, use_torch):
    """One shape: time a training step on every backend that has the cell
    (and torch) from the same parameters; the first step's loss is checked
    against the reference."""
    import fastrnn as fr
    from ..backends import supports
    rng = np.random.default_rng(0)
    x = rng.standard_normal((T, B, I)).astype(np.float32)
    y = rng.integers(0, I, (T, B))
    rows = []
    params = None
    for be in [n for n in names if supports(n, cell)]:
        core = {"lstm": fr.LSTM, "gru": fr.GRU, "rnn": fr.RNN}[cell](
            I, H, seed=0, backend=be)
        model = fr.SequenceModel(core, I)
        params = model.state_dict() if params is None else params
        model.load_state_dict(params)
        step = fr.TrainStep(model, fr.Adam(1e-3), clip=fr.ClipNorm(1.0))
        rows.append((be,) + _time(lambda: step(x, y).loss, seconds,
                                  min_reps=1 if be == "numpy" else 3))
    if use_torch:
        rows.append(("torch",) + _bench_torch(cell, x, y, params, I, H, seconds))
    ref = dict((r[0], r[3]) for r in rows)["numpy"]
    t_torch = next((r[1] for r in rows if r[0] == "torch"), None)
    return [dict(cell=cell, T=T, B=B, I=I, H=H, impl=be, ms=sec * 1e3, reps=n,
                 vs_torch=(t_torch / sec) if t_torch else None,
                 loss_matches_reference=bool(abs(loss - ref) <= 1e-4 * max(abs(ref), 1.0)))
            for be, sec, n, loss in rows]


def _bench_torch(cell, x, y, params, I, H, seconds):
    """The same step in PyTorch: nn.RNN/nn.LSTM/nn.GRU + nn.Linear + summed
    cross-entropy / B + clip_grad_norm_ + Adam, from the same parameters."""
    from .._torch_ref import TorchTrainStep
    step = TorchTrainStep(cell, I, H, I, params, optimizer="adam", lr=1e-3, clip_norm=1.0)
    xt, yt = step.tensors(x, y)
    return _time(lambda: step(xt, yt), seconds)


def _ms(v):
    return f"{v:.0f}" if v >= 100 else f"{v:.1f}" if v >= 10 else f"{v:.2f}"


def cmd_bench(args):
    import fastrnn as fr
    say = lambda s: print(s, flush=True)  # noqa: E731
    avail = fr.available_backends()
    names = ["numpy"] + [n for n in ("numba", "c", "cuda") if avail[n][0]]
    skipped = [f"{n} ({avail[n][1]})" for n in ("numba", "c", "cuda") if not avail[n][0]]
    use_torch = not args.no_torch
    if use_torch:
        try:
            import torch
        except ImportError:
            use_torch = False
            skipped.append("torch (not installed)")
    shapes = args.shape or BENCH_SHAPES
    cells = ({"both": ["rnn", "lstm"], "all": ["rnn", "lstm", "gru"]}.get(args.cell)
             or [args.cell])
    say("fastrnn bench: one training step (forward, cross-entropy at every step, BPTT, "
        "norm clipping, Adam), float32, median time")
    info = f"  {os.cpu_count()} CPUs"
    if use_torch:
        info += f"; torch {torch.__version__} with {torch.get_num_threads()} threads"
    say(info)
    if skipped:
        say("  not measured: " + "; ".join(skipped))
    rows = []
    for T, B, I, H in shapes:
        for cell in cells:
            rows += _bench_case(cell, T, B, I, H, args.seconds, names, use_torch)
    head = ["cell", "T x B, I -> H", "backend", "ms/step", "steps/s", "vs torch",
            "loss = reference"]
    table = []
    for r in rows:
        table.append([r["cell"].upper() if r["cell"] != "rnn" else "tanh RNN",
                      f"{r['T']} x {r['B']}, {r['I']} -> {r['H']}", r["impl"],
                      _ms(r["ms"]), f"{1e3 / r['ms']:.0f}",
                      f"{r['vs_torch']:.2f}x" if r["vs_torch"] else "-",
                      "yes" if r["loss_matches_reference"] else "NO"])
    w = [max(len(h), *(len(t[j]) for t in table)) for j, h in enumerate(head)]
    fmt = lambda r: "  ".join(c.rjust(w[j]) if j >= 3 else c.ljust(w[j])  # noqa: E731
                              for j, c in enumerate(r))
    say(fmt(head))
    for t in table:
        say(fmt(t))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
        say(f"wrote {args.json}")
    return 0 if all(r["loss_matches_reference"] for r in rows) else 1


def add_parser(sub):
    b = sub.add_parser("bench", help="quick speed table: backends, NumPy reference, PyTorch",
                       formatter_class=Formatter)
    b.add_argument("--shape", type=_parse_shape, action="append", metavar="T,B,I,H",
                   help="shape to measure (repeatable; default: 100,32,8,32 and "
                   "50,32,64,128)")
    b.add_argument("--cell", choices=["rnn", "lstm", "gru", "both", "all"], default="both",
                   help="both: rnn and lstm; all: rnn, lstm and gru")
    b.add_argument("--seconds", type=float, default=0.2,
                   help="time spent measuring each entry")
    b.add_argument("--no-torch", action="store_true", help="leave PyTorch out")
    b.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    b.set_defaults(func=cmd_bench)
