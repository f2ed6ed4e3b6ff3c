"""The ``fastrnn`` command line (also ``python -m fastrnn``)."""
import argparse
import json
import sys
import time

import numpy as np


def _build(args, task):
    import fastrnn as fr
    dtype = np.float64 if args.dtype == "float64" else np.float32
    kw = dict(num_layers=args.layers, bidirectional=args.bidirectional, dtype=dtype,
              init=args.init, seed=args.seed, backend=args.backend)
    if args.cell == "lstm":
        core = fr.LSTM(task.input_size, args.hidden, **kw)
    else:
        core = fr.RNN(task.input_size, args.hidden, nonlinearity=args.nonlinearity, **kw)
    model = fr.SequenceModel(core, task.output_size, loss=task.loss, readout=task.readout)
    opt = {"sgd": lambda: fr.SGD(args.lr, momentum=args.momentum),
           "adam": lambda: fr.Adam(args.lr),
           "adagrad": lambda: fr.Adagrad(args.lr)}[args.optimizer]()
    clip = None
    if args.clip_norm is not None and args.clip_value is not None:
        raise SystemExit("fastrnn train: give --clip-norm or --clip-value, not both")
    if args.clip_norm is not None:
        clip = fr.ClipNorm(args.clip_norm)
    elif args.clip_value is not None:
        clip = fr.ClipValue(args.clip_value)
    step = fr.TrainStep(model, opt, clip=clip, state_clip=args.state_clip)
    return model, step


def cmd_train(args):
    from .tasks import make_task
    task = make_task(args.task, args.T)
    model, step = _build(args, task)
    rng = np.random.default_rng(args.seed)
    test_rng = np.random.default_rng([args.seed if args.seed is not None else 0, 99])
    xt, yt = task.batch(test_rng, args.test_size)
    print(f"fastrnn train: task={task.name} T={args.T} cell={args.cell} H={args.hidden} "
          f"backend={model.backend} steps={args.steps} batch={args.batch}", flush=True)
    t0 = time.perf_counter()
    n_clip = n_skip = 0
    metric = float("nan")
    last = []
    for i in range(1, args.steps + 1):
        x, y = task.batch(rng, args.batch)
        r = step(x, y)
        n_clip += r.clipped
        n_skip += r.skipped
        last.append(r.loss)
        if i % args.eval_every == 0 or i == args.steps:
            z, _ = model(xt)
            metric = task.metric(z, yt)
            print(f"step {i:6d}  loss {np.mean(last):.4f}  grad_norm {r.grad_norm:8.3f}  "
                  f"test {metric:.5f}  clipped {n_clip}/{i}  "
                  f"{i / (time.perf_counter() - t0):.0f} steps/s", flush=True)
            last = []
            if args.stop_when_solved and task.solved(metric):
                break
    secs = time.perf_counter() - t0
    solved = task.solved(metric)
    summary = dict(task=task.name, T=args.T, cell=args.cell, steps=i, seconds=round(secs, 2),
                   test_metric=metric, solved=bool(solved), clipped=int(n_clip),
                   skipped=int(n_skip))
    print("summary " + json.dumps(summary), flush=True)
    return 0 if solved or not args.require_solved else 1


def cmd_backends(args):
    import fastrnn as fr
    for name, (ok, why) in fr.available_backends().items():
        print(f"{name:6s} {'yes' if ok else 'no ':3s}  {why}")
    return 0


def make_parser():
    p = argparse.ArgumentParser(prog="fastrnn", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train one model on a task (default: adding, T=100, LSTM)")
    t.add_argument("--task", default="adding")
    t.add_argument("--cell", choices=["lstm", "rnn"], default="lstm")
    t.add_argument("--nonlinearity", choices=["tanh", "relu", "sigmoid"], default="tanh")
    t.add_argument("--init", choices=["default", "orthogonal", "identity", "xavier"],
                   default="default")
    t.add_argument("--hidden", type=int, default=32)
    t.add_argument("--layers", type=int, default=1)
    t.add_argument("--bidirectional", action="store_true")
    t.add_argument("--T", type=int, default=100)
    t.add_argument("--batch", type=int, default=32)
    t.add_argument("--steps", type=int, default=4000)
    t.add_argument("--optimizer", choices=["sgd", "adam", "adagrad"], default="adam")
    t.add_argument("--lr", type=float, default=1e-2)
    t.add_argument("--momentum", type=float, default=0.0)
    t.add_argument("--clip-norm", type=float, default=1.0)
    t.add_argument("--clip-value", type=float, default=None)
    t.add_argument("--no-clip", dest="clip_norm", action="store_const", const=None)
    t.add_argument("--state-clip", type=float, default=None)
    t.add_argument("--backend", default="auto")
    t.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--eval-every", type=int, default=250)
    t.add_argument("--test-size", type=int, default=1000)
    t.add_argument("--stop-when-solved", action="store_true", default=True)
    t.add_argument("--no-stop", dest="stop_when_solved", action="store_false")
    t.add_argument("--require-solved", action="store_true",
                   help="exit with status 1 if the task is not solved")
    t.set_defaults(func=cmd_train)
    b = sub.add_parser("backends", help="which backends are available, and why not")
    b.set_defaults(func=cmd_backends)
    return p


def main(argv=None):
    args = make_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
