"""Sequence tasks for the command line, generated on the fly from a seeded
generator (numpy ``default_rng``), all time-major.

Every task has

    name, T, input_size, output_size, loss, readout, tokens (int ids or floats)
    metric_name, baseline (the metric of a trivial guess), threshold (solved
    when the metric is below it; None for the language model)
    batch(rng, B) -> (x, y)                 a fresh batch
    train_batch(rng, B, step) -> (x, y, reset)
        the batch for training step `step` (0-based); `reset` says whether the
        recurrent state starts from zero (always, except the language model,
        whose state is carried from one window to the next)
    test_set(seed, n) -> (x, y)             a fixed held-out set
    evaluate(model, test) -> metric         lower is better
    solved(metric) -> bool                  (None when there is no criterion)

The synthetic tasks are the standard long-term-dependency problems of
Hochreiter & Schmidhuber (1997), as used by Martens & Sutskever (2011),
Pascanu et al. (2013) and Le et al. (2015).
"""
import hashlib

import numpy as np


def _log_softmax(z):
    z = np.asarray(z, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


class Task:
    name = None
    tokens = False
    stateful = False
    metric_name = "metric"
    baseline = None
    threshold = None
    default_T = 100
    test_size = 1000

    def batch(self, rng, B):
        raise NotImplementedError(f"{type(self).__name__}: a task defines "
                                  "batch(rng, B) -> (x, y)")

    def train_batch(self, rng, B, step):
        x, y = self.batch(rng, B)
        return x, y, True

    def test_set(self, seed, n=None):
        """A fixed set of n sequences, drawn from a stream that training never uses."""
        n = self.test_size if n is None else int(n)
        return self.batch(np.random.default_rng([_seed(seed), 0x7e57]), n)

    def flow_batch(self, seed, B=64):
        """A fixed small batch for fr.gradient_flow."""
        return self.batch(np.random.default_rng([_seed(seed), 0xf10]), B)

    def metric(self, z, y):
        raise NotImplementedError(f"{type(self).__name__}: a task defines "
                                  "metric(z, y) -> float")

    def evaluate(self, model, test, chunk=2000):
        """The metric of `model` on `test`, forward only, in chunks of sequences."""
        x, y = test
        B = x.shape[1]
        total = 0.0
        for s in range(0, B, chunk):
            e = min(B, s + chunk)
            z, _ = model(x[:, s:e])
            yy = y[..., s:e] if self.readout == "all" else y[s:e]
            total += self.metric(z, yy) * (e - s)
        return total / B

    def solved(self, m):
        if self.threshold is None:
            return None
        return bool(m < self.threshold)

    def describe(self):
        return f"{self.name} T={self.T}"


def _seed(seed):
    return 0 if seed is None else int(seed)


def _check_T(name, T, lo):
    if isinstance(T, bool) or not isinstance(T, (int, np.integer)) or T < lo:
        raise ValueError(f"T: the {name} task needs an integer T >= {lo}, got {T!r}")
    return int(T)


class Adding(Task):
    """The adding problem (Hochreiter & Schmidhuber 1997; Le et al. 2015).

    Input (T, B, 2): channel 0 holds values U(0, 1), channel 1 marks two
    positions, one in each half of the sequence. Target: the sum of the two
    marked values, read out at the last step (mse). Always predicting 1 gives
    MSE 1/6; the task counts as solved at test MSE < 0.01.
    """
    name = "adding"
    input_size, output_size = 2, 1
    loss, readout = "mse", "last"
    metric_name = "test MSE"
    baseline = 1.0 / 6.0
    threshold = 0.01
    test_size = 2000

    def __init__(self, T=100):
        self.T = _check_T(self.name, T, 2)

    def batch(self, rng, B):
        T = self.T
        x = np.zeros((T, B, 2))
        x[:, :, 0] = rng.uniform(0, 1, (T, B))
        half = T // 2
        i = rng.integers(0, half, B)
        j = rng.integers(half, T, B)
        b = np.arange(B)
        x[i, b, 1] = 1
        x[j, b, 1] = 1
        y = (x[i, b, 0] + x[j, b, 0])[:, None]
        return x, y

    def metric(self, z, y):
        return float(np.mean((np.asarray(z, dtype=np.float64) - y) ** 2))


class TemporalOrder(Task):
    """The temporal-order problem (Hochreiter & Schmidhuber 1997, task 6a;
    Pascanu et al. 2013).

    Input: T token ids. Symbols 2..5 are distractors; at one position in
    [T/10, 2T/10) and one in [5T/10, 6T/10) the sequence holds A (id 0) or B
    (id 1). Target, read out at the last step: which of AA, AB, BA, BB
    occurred (4 classes, cross-entropy). Guessing gives 75% error; solved:
    < 1% error on 10,000 fresh sequences.
    """
    name = "temporal-order"
    tokens = True
    input_size, output_size = 6, 4
    loss, readout = "cross_entropy", "last"
    metric_name = "test error"
    baseline = 0.75
    threshold = 0.01
    test_size = 10000
    symbols = "ABcdef"

    def __init__(self, T=100):
        self.T = T = _check_T(self.name, T, 2)
        lo1 = T // 10
        hi1 = max(lo1 + 1, (2 * T) // 10)
        lo2 = max(hi1, (5 * T) // 10)
        hi2 = max(lo2 + 1, (6 * T) // 10)
        self.windows = ((lo1, hi1), (lo2, hi2))

    def batch(self, rng, B):
        x = rng.integers(2, 6, (self.T, B))
        (lo1, hi1), (lo2, hi2) = self.windows
        t1 = rng.integers(lo1, hi1, B)
        t2 = rng.integers(lo2, hi2, B)
        s = rng.integers(0, 2, (2, B))
        b = np.arange(B)
        x[t1, b] = s[0]
        x[t2, b] = s[1]
        return x, 2 * s[0] + s[1]

    def metric(self, z, y):
        return float(np.mean(np.argmax(z, axis=-1) != y))


class Memorization(Task):
    """Noiseless memorisation (Hochreiter & Schmidhuber 1997; Martens &
    Sutskever 2011; Pascanu et al. 2013).

    A pattern of P symbols (each one of K) is shown at steps 0..P-1; then
    blanks; at step P+T-1 a 'go' symbol; during the next P steps the network
    must output the pattern, and a blank at every other step (readout at
    every step, cross-entropy). Input ids: 0..K-1 pattern symbols, K blank,
    K+1 go; output classes: 0..K-1, K blank. Sequence length T + 2P: T is the
    delay between the end of the pattern and the recall signal. Metric: the
    fraction of wrongly recalled symbols (guessing: 1 - 1/K); solved < 1%.
    """
    name = "memorization"
    tokens = True
    loss, readout = "cross_entropy", "all"
    metric_name = "test error"
    threshold = 0.01
    test_size = 2000
    default_T = 50

    def __init__(self, T=50, pattern=5, symbols=4):
        self.T = _check_T(self.name, T, 1)
        self.P = int(pattern)
        self.K = int(symbols)
        if self.P < 1 or self.K < 2:
            raise ValueError(f"memorization: expected pattern >= 1 and symbols >= 2, "
                             f"got pattern={pattern}, symbols={symbols}")
        self.input_size = self.K + 2
        self.output_size = self.K + 1
        self.baseline = 1.0 - 1.0 / self.K
        self.length = self.T + 2 * self.P

    def batch(self, rng, B):
        P, K, T = self.P, self.K, self.T
        pat = rng.integers(0, K, (P, B))
        x = np.full((self.length, B), K, dtype=np.int64)
        x[:P] = pat
        x[P + T - 1] = K + 1
        y = np.full((self.length, B), K, dtype=np.int64)
        y[P + T:] = pat
        return x, y

    def metric(self, z, y):
        r = slice(self.P + self.T, None)   # the recall steps
        return float(np.mean(np.argmax(z[r], axis=-1) != y[r]))

    def describe(self):
        return f"{self.name} T={self.T} (pattern {self.P} of {self.K} symbols)"


class CharLM(Task):
    """Character-level language model on a text file.

    The vocabulary is the file's set of characters. The last `valid_fraction`
    of the text is held out. The training text is cut into B parallel
    streams; training step s reads window s (T characters) of every stream
    and predicts the next character at every position (truncated BPTT); the
    final state of a window is the initial state of the next (state carry),
    reset to zero when the streams start over. Metric: bits per character on
    the held-out text (always predicting the unigram frequencies gives the
    baseline: the entropy of the character distribution).
    """
    name = "char"
    tokens = True
    stateful = True
    loss, readout = "cross_entropy", "all"
    metric_name = "test bits/char"
    default_T = 64
    test_size = 16  # held-out streams

    def __init__(self, text, T=64, valid_fraction=0.1, path=None):
        self.T = _check_T(self.name, T, 1)
        if not isinstance(text, str):
            raise TypeError(f"text: expected a str, got {type(text).__name__}")
        if len(text) < 4 * (T + 1):
            raise ValueError(f"text: expected at least {4 * (T + 1)} characters for "
                             f"T={T}, got {len(text)}")
        self.path = path
        self.vocab = "".join(sorted(set(text)))
        self.sha256 = hashlib.sha256(text.encode("utf-8")).hexdigest()
        self.input_size = self.output_size = len(self.vocab)
        self._index = {c: i for i, c in enumerate(self.vocab)}
        ids = self.encode(text)
        n_valid = max(T + 1, int(len(ids) * valid_fraction))
        self.train_ids, self.valid_ids = ids[:-n_valid], ids[-n_valid:]
        counts = np.bincount(self.train_ids, minlength=len(self.vocab))
        p = counts[counts > 0] / counts.sum()
        self.baseline = float(-(p * np.log2(p)).sum())
        self._streams = {}

    @classmethod
    def from_file(cls, path, T=64, **kw):
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
        return cls(text, T, path=str(path), **kw)

    def encode(self, s):
        missing = sorted(set(s) - set(self._index))
        if missing:
            raise ValueError(f"text: characters {''.join(missing)!r} are not in the "
                             f"model's vocabulary")
        return np.fromiter((self._index[c] for c in s), dtype=np.int64, count=len(s))

    def decode(self, ids):
        return "".join(self.vocab[i] for i in ids)

    def _stream_matrix(self, B):
        if B not in self._streams:
            L = len(self.train_ids) // B
            if L < self.T + 1:
                raise ValueError(f"batch: {B} streams of the training text are shorter "
                                 f"than T+1={self.T + 1} characters; use a smaller "
                                 f"batch or T, or a longer text")
            self._streams[B] = self.train_ids[:B * L].reshape(B, L).T.copy()  # (L, B)
        return self._streams[B]

    def windows_per_epoch(self, B):
        return (self._stream_matrix(B).shape[0] - 1) // self.T

    def train_batch(self, rng, B, step):
        S = self._stream_matrix(B)
        w = step % self.windows_per_epoch(B)
        a = w * self.T
        return S[a:a + self.T], S[a + 1:a + self.T + 1], w == 0

    def batch(self, rng, B):
        """B random windows of the training text (no state carry)."""
        start = rng.integers(0, len(self.train_ids) - self.T - 1, B)
        idx = start[None, :] + np.arange(self.T + 1)[:, None]
        seq = self.train_ids[idx]
        return seq[:-1], seq[1:]

    def test_set(self, seed=None, n=None):
        """The held-out text as n parallel streams (each starting from zero state)."""
        n = self.test_size if n is None else int(n)
        n = max(1, min(n, (len(self.valid_ids) - 1) // self.T))
        L = (len(self.valid_ids) - 1) // n
        v = self.valid_ids
        x = v[:n * L].reshape(n, L).T
        y = v[1:n * L + 1].reshape(n, L).T
        return np.ascontiguousarray(x), np.ascontiguousarray(y)

    def flow_batch(self, seed, B=16):
        x, y, _ = self.train_batch(None, min(B, len(self.train_ids) // (self.T + 1)), 0)
        return x, y

    def evaluate(self, model, test, chunk=None):
        x, y = test
        z, _ = model(x)
        return self.metric(z, y)

    def metric(self, z, y):
        lp = _log_softmax(z)
        nll = -np.take_along_axis(lp, y[..., None], axis=-1)
        return float(nll.mean() / np.log(2.0))

    def describe(self):
        src = self.path or "text"
        return (f"char-level LM on {src} ({len(self.train_ids)} train / "
                f"{len(self.valid_ids)} held-out chars, vocabulary {len(self.vocab)}), "
                f"BPTT window T={self.T}")


TASKS = {"adding": Adding, "temporal-order": TemporalOrder,
         "memorization": Memorization, "char": CharLM}
ALIASES = {"order": "temporal-order", "temporal_order": "temporal-order",
           "memorisation": "memorization", "memory": "memorization",
           "char-lm": "char", "text": "char"}


def task_name(name):
    """Canonical task name (accepts a few aliases)."""
    name = ALIASES.get(name, name)
    if name not in TASKS:
        raise ValueError(f"task: expected one of {tuple(TASKS)}, got {name!r}")
    return name


def make_task(name, T=None, *, text=None, **kw):
    """A task by name. T=None takes the task's default; the char task needs
    `text` (a path to a text file)."""
    name = task_name(name)
    cls = TASKS[name]
    T = cls.default_T if T is None else T
    if name == "char":
        if text is None:
            raise ValueError("text: the char task needs a text file (--text FILE)")
        return CharLM.from_file(text, T, **kw)
    return cls(T, **kw)
