"""fastrnn.torch in a PyTorch training loop, against torch.nn and against
fastrnn's own NumPy API.

One step = zero_grad, forward (recurrent core + nn.Linear read-out at every
step), cross-entropy (sum over time, mean over the batch), backward,
clip_grad_norm_(1.0), Adam(lr=1e-3). float32, T=100, I=32, O=10, the grid
B in {1, 16, 64} x H in {32, 128, 512}, cells rnn (tanh) and lstm.

Implementations: "nn" (torch.nn.RNN / nn.LSTM), "frt" (fastrnn.torch.RNN /
LSTM in the same loop) and "fr" (fr.TrainStep with fr.Adam and
fr.ClipNorm: the fused NumPy API, the speed-up frt should keep). Before
timing, frt's loss and every gradient after clipping are checked against
nn's from the same weights (rtol 1e-4, absolute floor 1e-4 * max|ref|), and
fr's loss against nn's.

test_glue: the cost of the autograd glue, i.e. one module forward+backward
through torch minus the same backend's core_forward+core_backward called
directly on NumPy arrays (both timed interleaved, minimum of many short
runs; extra_info glue_us).

    pytest benchmarks/test_bench_torch_modules.py --benchmark-json=out.json
    python benchmarks/test_bench_torch_modules.py out.json     # the table
"""
import json
import sys
import time

import numpy as np
import pytest

import fastrnn as fr

torch = pytest.importorskip("torch") if __name__ != "__main__" else None

T, I, O = 100, 32, 10
BATCHES = (1, 16, 64)
HIDDENS = (32, 128, 512)
CELLS = ("rnn", "lstm")
IMPLS = ("nn", "frt", "fr")
LR, MAX_NORM = 1e-3, 1.0
RTOL = 1e-4
BUDGET_S = 2.0      # timing per point (at least MIN_ROUNDS rounds)
MIN_ROUNDS = 3


def _close(a, b, what):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = float(np.abs(b).max()) if b.size else 0.0
    np.testing.assert_allclose(a, b, rtol=RTOL, atol=RTOL * max(scale, 1e-30),
                               err_msg=what)


def _data(B):
    g = torch.Generator().manual_seed(1000 + B)
    x = torch.randn(T, B, I, generator=g)
    y = torch.randint(0, O, (T, B), generator=g)
    return x, y


def _torch_model(impl, cell, H):
    import fastrnn.torch as frt
    torch.manual_seed(0)
    ref = (torch.nn.LSTM(I, H) if cell == "lstm" else torch.nn.RNN(I, H))
    if impl == "frt":
        core = frt.LSTM(I, H) if cell == "lstm" else frt.RNN(I, H)
        core.load_state_dict(ref.state_dict())
    else:
        core = ref
    torch.manual_seed(1)
    head = torch.nn.Linear(H, O)
    return core, head


def _torch_step(core, head, x, y):
    params = list(core.parameters()) + list(head.parameters())
    opt = torch.optim.Adam(params, lr=LR)
    B = x.shape[1]

    def loss_grad():
        opt.zero_grad()
        z = head(core(x)[0])
        loss = torch.nn.functional.cross_entropy(
            z.reshape(-1, O), y.reshape(-1), reduction="sum") / B
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, MAX_NORM)
        return loss

    def step():
        loss = loss_grad()
        opt.step()
        return loss

    return step, loss_grad, params


def _fr_step(cell, H, core, head, x, y):
    Cell = fr.LSTM if cell == "lstm" else fr.RNN
    model = fr.SequenceModel(Cell(I, H, dtype=np.float32), O)
    sd = {k: v.detach().numpy() for k, v in core.state_dict().items()}
    sd["weight_out"] = head.weight.detach().numpy()
    sd["bias_out"] = head.bias.detach().numpy()
    model.load_state_dict(sd)
    ts = fr.TrainStep(model, fr.Adam(LR), clip=fr.ClipNorm(MAX_NORM))
    xn, yn = x.numpy(), y.numpy()
    return lambda: ts(xn, yn)


def pytest_generate_tests(metafunc):
    if "impl" in metafunc.fixturenames:
        cells = [c for c in metafunc.config.getoption("bench_cells").split(",")
                 if c in CELLS]
        metafunc.parametrize("cell,B,H,impl", [
            pytest.param(c, B, H, m, id=f"{c}-B{B}-H{H}-{m}")
            for c in cells for B in BATCHES for H in HIDDENS for m in IMPLS])


def _check(cell, B, H):
    """frt's loss and clipped gradients against nn's; fr's loss too."""
    x, y = _data(B)
    out = {}
    for impl in ("nn", "frt"):
        core, head = _torch_model(impl, cell, H)
        _, loss_grad, params = _torch_step(core, head, x, y)
        loss = loss_grad()
        out[impl] = (float(loss), [p.grad.numpy().copy() for p in params])
    _close(out["frt"][0], out["nn"][0], "loss")
    for k, (a, b) in enumerate(zip(out["frt"][1], out["nn"][1])):
        _close(a, b, f"clipped gradient {k}")
    core, head = _torch_model("nn", cell, H)
    _close(_fr_step(cell, H, core, head, x, y)().loss, out["nn"][0], "fr loss")


def _time(benchmark, fn):
    fn()
    t0 = time.perf_counter()
    fn()
    t1 = time.perf_counter() - t0
    rounds = max(MIN_ROUNDS, min(50, int(BUDGET_S / max(t1, 1e-6))))
    benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=1)


def _threads():
    import numba
    return {"torch_threads": torch.get_num_threads(),
            "numba_threads": numba.get_num_threads()}


def test_train_step(benchmark, cell, B, H, impl):
    benchmark.group = f"torch loop {cell} B={B} H={H}"
    if impl == "frt":
        _check(cell, B, H)
    x, y = _data(B)
    core, head = _torch_model("nn" if impl == "fr" else impl, cell, H)
    fn = (_fr_step(cell, H, core, head, x, y) if impl == "fr"
          else _torch_step(core, head, x, y)[0])
    benchmark.extra_info.update(cell=cell, B=B, H=H, T=T, impl=impl,
                                **_threads())
    _time(benchmark, fn)


GLUE_SHAPES = [(1, 1, 1, 1), (100, 1, 32, 32), (100, 16, 32, 128)]


@pytest.mark.parametrize("cell", ["rnn", "lstm"])
@pytest.mark.parametrize("shape", GLUE_SHAPES,
                         ids=[f"T{s[0]}-B{s[1]}-I{s[2]}-H{s[3]}" for s in GLUE_SHAPES])
def test_glue(benchmark, cell, shape):
    """Module forward+backward through torch against the backend's own
    core_forward+core_backward on the same arrays."""
    import fastrnn.torch as frt
    from fastrnn import backends
    from fastrnn.torch import ops
    Tg, B, Ig, H = shape
    benchmark.group = f"glue {cell} T={Tg} B={B} I={Ig} H={H}"
    torch.manual_seed(0)
    m = frt.LSTM(Ig, H) if cell == "lstm" else frt.RNN(Ig, H)
    x = torch.randn(Tg, B, Ig, requires_grad=True)
    g = torch.ones(Tg, B, H)

    def module():
        m(x)[0].backward(g)

    be = backends.get(m.backend)
    spec = m._spec
    flat = ops._flat_params(list(m.parameters())).numpy()
    xn, gn = x.detach().numpy(), g.numpy()
    ln = np.full(B, Tg, np.int64)
    st0 = np.zeros((spec.S, 1, B, H), np.float32)
    ctx = {}

    def direct():
        _, st, cache = be.core_forward(spec, flat, xn, ln, st0, ctx=ctx)
        be.core_backward(spec, flat, cache, gn, np.zeros_like(st), None, ctx=ctx)

    n = max(1, int(2e-3 / max(_once(direct), 1e-7)))
    best = {"module": [], "direct": []}
    for _ in range(60):
        for name, f in (("module", module), ("direct", direct)):
            t = time.perf_counter()
            for _ in range(n):
                f()
            best[name].append((time.perf_counter() - t) / n * 1e6)
    mod, dr = min(best["module"]), min(best["direct"])
    benchmark.extra_info.update(cell=cell, T=Tg, B=B, I=Ig, H=H,
                                module_us=round(mod, 1), direct_us=round(dr, 1),
                                glue_us=round(mod - dr, 1), **_threads())
    benchmark.pedantic(module, rounds=max(3, 20 * n), iterations=1)


def _once(f):
    f()
    t = time.perf_counter()
    f()
    return time.perf_counter() - t


def report(path):
    """Markdown tables from a --benchmark-json file."""
    with open(path) as fh:
        data = json.load(fh)
    steps, glue = {}, []
    for b in data["benchmarks"]:
        e = b["extra_info"]
        if "impl" in e:
            steps[(e["cell"], e["B"], e["H"], e["impl"])] = b["stats"]["median"] * 1e3
        elif "glue_us" in e:
            glue.append(e)
    lines = ["| cell | B | H | nn ms | frt ms | fr ms | nn/frt | nn/fr | frt keeps |",
             "|---|---|---|---|---|---|---|---|---|"]
    for cell in CELLS:
        for B in BATCHES:
            for H in HIDDENS:
                v = [steps.get((cell, B, H, m)) for m in IMPLS]
                if None in v:
                    continue
                nn_, frt_, fr_ = v
                lines.append(f"| {cell} | {B} | {H} | {nn_:.2f} | {frt_:.2f} | "
                             f"{fr_:.2f} | {nn_ / frt_:.2f}x | {nn_ / fr_:.2f}x | "
                             f"{fr_ / frt_:.0%} |")
    lines += ["", "| cell | T | B | I | H | module fwd+bwd us | backend direct us | glue us |",
              "|---|---|---|---|---|---|---|---|"]
    for e in glue:
        lines.append(f"| {e['cell']} | {e['T']} | {e['B']} | {e['I']} | {e['H']} | "
                     f"{e['module_us']} | {e['direct_us']} | {e['glue_us']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(report(sys.argv[1]))
