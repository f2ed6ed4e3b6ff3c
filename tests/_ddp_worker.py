"""One rank of the DDP test (tests/test_ddp.py), and the model, data and
training loop that the test's single-process run shares with it.

Run as ``python tests/_ddp_worker.py RANK WORLD STORE_FILE OUT_FILE``: joins
a gloo process group through a FileStore (loopback interface, 60 s timeout
on every collective), trains every case of CASES under
DistributedDataParallel on its share of each global batch, starting from
parameters that differ between ranks (DDP must broadcast rank 0's), and
saves, per case, the parameters and the loss after every step and whether
the fastrnn module's parameters are still views of one flat buffer.
"""
import datetime
import sys
import traceback

import torch
from torch import nn

import fastrnn.torch as frt
from fastrnn.torch import ops

T, B, V, E, H = 5, 6, 7, 4, 5   # steps, global batch (even), vocab, embed, hidden
STEPS = 5

# name: (recurrent module, optimizer, DDP keywords)
CASES = {
    "torch_lstm_sgd": ("nn.LSTM", "sgd", {}),
    "torch_lstm_adam": ("nn.LSTM", "adam", {}),
    "lstm_sgd": ("LSTM", "sgd", {}),
    "lstm_adam_bucket_view": ("LSTM", "adam", {"gradient_as_bucket_view": True}),
    "lstm2_bidir_adam_small_buckets": ("LSTM2", "adam", {"bucket_cap_mb": 0.0005}),
    "rnn2_bidir_adam_find_unused": ("RNN2", "adam", {"find_unused_parameters": True}),
    "lstm_sgd_static_graph": ("LSTM", "sgd", {"static_graph": True}),
    "lstm_adam_custom_op": ("LSTM", "adam", {}),
}
# through the custom ops with their registered autograd (what compiled code
# runs) instead of ops._Eager
CUSTOM_OP = {"lstm_adam_custom_op"}


class Net(nn.Module):
    """Embedding -> recurrent layer (batch_first) -> Linear."""

    def __init__(self, kind):
        super().__init__()
        self.emb = nn.Embedding(V, E)
        D = 1
        if kind == "nn.LSTM":
            self.rnn = nn.LSTM(E, H, batch_first=True)
        elif kind == "LSTM":
            self.rnn = frt.LSTM(E, H, batch_first=True)
        elif kind == "LSTM2":
            self.rnn = frt.LSTM(E, H, num_layers=2, bidirectional=True,
                                batch_first=True)
            D = 2
        elif kind == "RNN2":
            self.rnn = frt.RNN(E, H, num_layers=2, bidirectional=True,
                               batch_first=True)
            D = 2
        else:
            raise ValueError(f"kind: unknown {kind!r}")
        self.out = nn.Linear(D * H, V)

    def forward(self, x):
        return self.out(self.rnn(self.emb(x))[0])


def build(case, seed):
    """The case's model in float64, initialised from torch.manual_seed(seed)."""
    torch.manual_seed(seed)
    return Net(CASES[case][0]).double()


def optimizer(case, params):
    if CASES[case][1] == "sgd":
        return torch.optim.SGD(params, lr=0.5, momentum=0.9)
    return torch.optim.Adam(params, lr=0.05)


def batches():
    """STEPS global batches: token ids (B, T) and next-token targets."""
    g = torch.Generator().manual_seed(1234)
    xs = torch.randint(0, V, (STEPS, B, T), generator=g)
    return xs, xs.roll(-1, dims=2)


def train(case, model, opt, xs, ys, rows):
    """STEPS steps of `case` on rows `rows` of each batch; returns the
    parameters (name -> tensor, the inner module's names) and loss after
    each step."""
    inner = getattr(model, "module", model)
    params, losses = [], []
    eager = ops.EAGER_FUNCTION
    ops.EAGER_FUNCTION = case not in CUSTOM_OP
    try:
        for x, y in zip(xs, ys):
            _step(model, inner, opt, x, y, rows, params, losses)
    finally:
        ops.EAGER_FUNCTION = eager
    return params, losses


def _step(model, inner, opt, x, y, rows, params, losses):
    opt.zero_grad()
    logits = model(x[rows])
    loss = nn.functional.cross_entropy(logits.reshape(-1, V), y[rows].reshape(-1))
    loss.backward()
    opt.step()
    losses.append(loss.detach().clone())
    params.append({k: v.detach().clone() for k, v in inner.named_parameters()})


def flat_intact(rnn):
    """Whether a fastrnn.torch module's parameters are still consecutive
    views of one buffer (the kernels then read them without a copy)."""
    ps = rnn._params()
    # _flat_params copies (a new data pointer) unless they are
    return ops._flat_params(ps).data_ptr() == ps[0].data_ptr()


def main(rank, world, store_file, out_file):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    store = dist.FileStore(store_file, world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        xs, ys = batches()
        share = B // world
        rows = slice(rank * share, (rank + 1) * share)
        res = {}
        for case in CASES:
            # each rank its own initial parameters: DDP takes rank 0's
            model = build(case, seed=100 + rank)
            ddp = DDP(model, **CASES[case][2])
            opt = optimizer(case, ddp.parameters())
            params, losses = train(case, ddp, opt, xs, ys, rows)
            rnn = model.rnn
            res[case] = {"params": params, "losses": losses,
                         "flat": flat_intact(rnn) if isinstance(rnn, frt.modules._Base)
                         else None}
        torch.save(res, out_file)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
    except BaseException:
        traceback.print_exc()
        sys.exit(1)
