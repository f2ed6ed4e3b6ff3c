"""`fastrnn sample`: text generated one character at a time from a character
model's checkpoint (the state carried, a softmax temperature, an optional
prime).
"""
import math
import os
import sys

import numpy as np

from ..checkpoint import RUN_CHECKPOINT as CHECKPOINT
from .errors import RunError, UsageError
from .options import Formatter


def cmd_sample(args):
    from .. import checkpoint as ckmod
    path = args.checkpoint
    if os.path.isdir(path):
        path = os.path.join(path, CHECKPOINT)
    if not os.path.isfile(path):
        raise UsageError(f"checkpoint: no such file: {path}")
    try:
        ck = ckmod.load(path)
    except ValueError as e:
        raise UsageError(str(e)) from None
    vocab = ck.extra.get("vocab")
    m = ck.model
    if not (vocab and isinstance(vocab, str) and m.readout == "all"
            and m.loss == "cross_entropy" and m.core.input_size == len(vocab)
            and m.output_size == len(vocab)):
        raise UsageError(f"{path}: not a character-model checkpoint (train one with "
                         "`fastrnn train --task char --text FILE`)")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise UsageError(f"--temperature: expected a number >= 0, got {args.temperature}")
    if args.length < 0:
        raise UsageError(f"--length: expected an integer >= 0, got {args.length}")
    if args.seed is not None and args.seed < 0:
        raise UsageError(f"--seed: expected an integer >= 0, got {args.seed}")
    text = sample_text(ck.model, vocab, args.length, temperature=args.temperature,
                       prime=args.prime, seed=args.seed)
    sys.stdout.write(text + "\n")
    sys.stdout.flush()
    return 0


def sample_text(model, vocab, length, *, temperature=1.0, prime="", seed=None):
    """prime + `length` characters drawn from the model, one at a time, with
    its state carried. temperature 0: always the most likely character."""
    if model.core.bidirectional:
        raise UsageError("sample: a bidirectional model cannot generate text")
    index = {c: i for i, c in enumerate(vocab)}
    rng = np.random.default_rng(seed)
    if not prime:
        prime = "\n" if "\n" in index else vocab[int(rng.integers(len(vocab)))]
        shown = ""
    else:
        shown = prime
    missing = sorted(set(prime) - set(index))
    if missing:
        raise UsageError(f"--prime: characters {''.join(missing)!r} are not in the "
                         "model's vocabulary")
    ids = np.array([index[c] for c in prime], dtype=np.int64)[:, None]
    z, h = model(ids)
    logits = np.asarray(z[-1, 0], dtype=np.float64)
    if not np.all(np.isfinite(logits)):
        raise RunError("the model's outputs are not finite (its parameters hold NaN or inf)")
    out = []
    for _ in range(length):
        if temperature == 0:
            c = int(np.argmax(logits))
        else:
            with np.errstate(over="ignore"):   # a tiny temperature: -inf -> p = 0
                p = np.exp((logits - logits.max()) / temperature)
            c = int(rng.choice(len(vocab), p=p / p.sum()))
        out.append(vocab[c])
        z, h = model(np.array([[c]], dtype=np.int64), hx=h)
        logits = np.asarray(z[0, 0], dtype=np.float64)
        if not np.all(np.isfinite(logits)):
            raise RunError("the model's outputs are not finite (its parameters hold "
                           "NaN or inf)")
    return shown + "".join(out)


def add_parser(sub):
    s = sub.add_parser("sample", help="generate text from a character-model checkpoint",
                       formatter_class=Formatter)
    s.add_argument("checkpoint", help="a run directory or its checkpoint.npz")
    s.add_argument("--length", type=int, default=300, help="characters to generate")
    s.add_argument("--temperature", type=float, default=0.8,
                   help="softmax temperature (0: always the most likely character)")
    s.add_argument("--prime", default="", help="text to start from")
    s.add_argument("--seed", type=int, default=None, help="random seed")
    s.set_defaults(func=cmd_sample)
