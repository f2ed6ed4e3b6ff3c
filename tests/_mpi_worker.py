"""The rank side of tests/test_mpi.py, started by the test under
`mpiexec -n 2 python tests/_mpi_worker.py OUTDIR BACKEND...`.

CASES and batches() are imported by the test too: it trains one process on
the concatenated batches and compares with what every rank wrote here
(OUTDIR/rank{r}.npz). Ranks build their models from different seeds, so
equal results also show that rank 0's parameters were broadcast.
"""
import sys

import numpy as np

STEPS = 3
T = 4

# name: (cell, rows of rank 0 and rank 1, optimizer, clip, model options,
#        step at which rank 1's input is NaN or None); float64 unless the
#        options say otherwise
CASES = {
    "rnn_sgd_norm": ("rnn", (3, 3), ("sgd", 0.1, 0.9), ("norm", 0.5), {}, None),
    "lstm_adam_value": ("lstm", (2, 5), ("adam", 0.01), ("value", 0.05), {}, None),
    "rnn_adagrad_last": ("rnn", (1, 4), ("adagrad", 0.1), None,
                         dict(readout="last", loss="mse", nonlinearity="relu"), None),
    "lstm_tokens_bidir": ("lstm", (3, 2), ("adam", 0.01), ("norm", 1.0),
                          dict(tokens=True, bidirectional=True, num_layers=2), None),
    "rnn_nan": ("rnn", (2, 3), ("adam", 0.01), ("norm", 1.0), {}, 1),
    "lstm_float32": ("lstm", (4, 1), ("sgd", 0.1, 0.0), ("norm", 0.5),
                     dict(dtype=np.float32), None),
}
I, H, O = 3, 5, 4


def build(case, backend, seed):
    import fastrnn as fr
    cell, _, opt, clip, kw, _ = CASES[case]
    kw = dict(kw)
    readout, loss = kw.pop("readout", "all"), kw.pop("loss", "cross_entropy")
    kw.pop("tokens", None)
    dtype = kw.pop("dtype", np.float64)
    Layer = fr.LSTM if cell == "lstm" else fr.RNN
    core = Layer(I, H, dtype=dtype, seed=seed, backend=backend, **kw)
    model = fr.SequenceModel(core, O, loss=loss, readout=readout)
    optim = {"sgd": lambda: fr.SGD(opt[1], momentum=opt[2]),
             "adam": lambda: fr.Adam(opt[1]),
             "adagrad": lambda: fr.Adagrad(opt[1])}[opt[0]]()
    clipper = None if clip is None else (fr.ClipNorm if clip[0] == "norm"
                                         else fr.ClipValue)(clip[1])
    return model, optim, clipper


def batches(case):
    """[(x, y, lengths)] of the global batch for each step, and the rows of
    each rank."""
    _, rows, _, _, kw, nan_at = CASES[case]
    rng = np.random.default_rng(list(CASES).index(case))
    B = sum(rows)
    out = []
    for s in range(STEPS):
        if kw.get("tokens"):
            x = rng.integers(0, I, (T, B))
        else:
            x = rng.standard_normal((T, B, I))
            if s == nan_at:
                x[0, rows[0], 0] = np.nan        # in rank 1's first row
        lengths = rng.integers(1, T + 1, B)
        if kw.get("readout") == "last":
            y = rng.standard_normal((B, O))
        else:
            y = rng.integers(0, O, (T, B))
        out.append((x, y, lengths))
    return out, rows


def rank_slice(case, batch, rows, r):
    """Rank r's rows of a global batch (x, y, lengths)."""
    a = sum(rows[:r])
    b = a + rows[r]
    x, y, lengths = batch
    y = y[a:b] if CASES[case][4].get("readout") == "last" else y[:, a:b]
    return x[:, a:b], y, lengths[a:b]


def main(outdir, backends):
    from mpi4py import MPI

    import fastrnn as fr
    comm = MPI.COMM_WORLD
    r = comm.Get_rank()
    rec = {}
    for be in backends:
        for case in CASES:
            model, optim, clipper = build(case, be, seed=10 + r)
            step = fr.TrainStep(model, optim, clip=clipper, comm=comm)
            data, rows = batches(case)
            res = []
            for batch in data:
                x, y, ln = rank_slice(case, batch, rows, r)
                res.append(step(x, y, lengths=ln))
            key = f"{be}/{case}"
            rec[key + "/params"] = model._params().copy()
            rec[key + "/opt"] = step.state_dict()["opt_state"]
            rec[key + "/steps"] = np.array(step.steps)
            rec[key + "/stats"] = np.array([[q.loss, q.grad_norm, q.clipped, q.skipped]
                                            for q in res])
            hx = res[-1].hx
            rec[key + "/hx"] = np.stack(hx) if isinstance(hx, tuple) else hx[None]
    # ranks that differ in architecture are refused on every rank
    model, optim, _ = build("rnn_sgd_norm", "numpy", seed=1)
    if r == 1:
        model, optim, _ = build("lstm_adam_value", "numpy", seed=1)
    try:
        fr.TrainStep(model, optim, comm=comm)
        rec["refused"] = np.array("")
    except ValueError as e:
        rec["refused"] = np.array(str(e))
    # a rank whose part of a step raises makes every rank raise, none waits
    model, optim, _ = build("rnn_sgd_norm", "numpy", seed=1)
    step = fr.TrainStep(model, optim, comm=comm)
    before = model._params().copy()
    x, y, ln = rank_slice("rnn_sgd_norm", batches("rnn_sgd_norm")[0][0], (3, 3), r)
    if r == 1:
        y = y + O                                # class ids out of range
    try:
        step(x, y, lengths=ln)
        rec["failed"] = np.array("")
    except (ValueError, RuntimeError) as e:
        rec["failed"] = np.array(f"{type(e).__name__}: {e}")
    rec["unchanged"] = np.array(np.array_equal(before, model._params()))
    np.savez(f"{outdir}/rank{r}.npz", **rec)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
