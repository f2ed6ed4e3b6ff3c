"""Options shared by subcommands: the help formatter, the model/task/training
options of `train` and `compare` (they parse to None when not given, so a
resumed run can tell what was given) and the task presets shown in the
help's epilog.
"""
import argparse

from .. import tasks as _tasks
from .config import TASK_DEFAULTS


class Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def presets_text(extra=None):
    """The per-task presets, for the help's epilog (generated from the tables)."""
    lines = ["task presets (they replace the defaults above; options you give win):"]
    for task, d in TASK_DEFAULTS.items():
        d = dict(d, **(extra or {}))
        items = [("--" + k.replace("_", "-") + " " + f"{v:g}" if isinstance(v, float)
                  else "--" + k.replace("_", "-") + f" {v}") for k, v in d.items()
                 if k != "stop_when_solved"]
        if d.get("stop_when_solved") is False:
            items.append("--no-stop")
        lines.append(f"  {task}: " + ", ".join(items))
    lines.append("  T defaults to the task's own: " + ", ".join(
        f"{n} {c.default_T}" for n, c in _tasks.TASKS.items()))
    return "\n".join(lines)


def model_options(p, defaults, *, cell=True):
    """Options shared by train and compare. They parse to None when not given:
    the defaults (`defaults`, then the task's preset) are filled in later, so
    that a resumed run can tell what was given."""
    def d(key):
        v = defaults[key]
        return f"(default: {v:g})" if isinstance(v, float) else f"(default: {v})"
    g = p.add_argument_group("task")
    g.add_argument("--task", help="adding | temporal-order | memorization | char "
                   + d("task"))
    g.add_argument("--T", type=int, help="sequence length; memorization: the delay "
                   "before recall; char: the truncated-BPTT window (default: the task's)")
    g.add_argument("--text", metavar="FILE", help="text file for --task char")
    g.add_argument("--test-size", type=int, metavar="N",
                   help="held-out sequences (default: the task's: adding 2000, "
                   "temporal-order 10000, memorization 2000; char: 16 streams)")
    g = p.add_argument_group("model")
    if cell:
        g.add_argument("--cell", choices=["lstm", "rnn", "gru"], help=d("cell"))
        g.add_argument("--nonlinearity", choices=["tanh", "relu", "sigmoid"],
                       help="for --cell rnn " + d("nonlinearity"))
        g.add_argument("--init", choices=["default", "orthogonal", "identity", "xavier"],
                       help=d("init") + "; identity: IRNN, with --cell rnn")
    g.add_argument("--forget-bias", type=float, metavar="B",
                   help="LSTM: set the forget-gate bias to B after init "
                   "(default: the init's)")
    g.add_argument("--hidden", type=int, metavar="H", help="hidden size " + d("hidden"))
    g.add_argument("--layers", type=int, metavar="L", help="stacked layers " + d("layers"))
    g.add_argument("--bidirectional", action="store_const", const=True)
    g.add_argument("--backend", choices=["auto", "numba", "numpy", "c", "cuda"],
                   help=d("backend"))
    g.add_argument("--dtype", choices=["float32", "float64"], help=d("dtype"))
    g = p.add_argument_group("training")
    g.add_argument("--batch", type=int, metavar="B", help="sequences per step " + d("batch"))
    g.add_argument("--steps", type=int, metavar="N", help="training steps " + d("steps"))
    g.add_argument("--optimizer", choices=["adam", "sgd", "adagrad"], help=d("optimizer"))
    g.add_argument("--lr", type=float, help="learning rate " + d("lr"))
    g.add_argument("--momentum", type=float, help="for --optimizer sgd " + d("momentum"))
    g.add_argument("--clip-norm", type=float, metavar="G",
                   help="rescale the gradient when its global norm exceeds G "
                   + d("clip_norm"))
    if cell:
        g.add_argument("--clip-value", type=float, metavar="C",
                       help="clamp every gradient element to [-C, C] (instead of "
                       "--clip-norm)")
        g.add_argument("--no-clip", action="store_true", help="no gradient clipping")
    g.add_argument("--state-clip", type=float, metavar="C",
                   help="clamp dL/dh_t to [-C, C] inside BPTT")
    g.add_argument("--seed", type=int, help="seeds the parameters and the data "
                   + d("seed"))
    g.add_argument("--eval-every", type=int, metavar="N",
                   help="steps between test evaluations " + d("eval_every"))
    g.add_argument("--stop", dest="stop_when_solved", action="store_const", const=True,
                   help="stop when the task is solved (the default)")
    g.add_argument("--no-stop", dest="stop_when_solved", action="store_const", const=False,
                   help="train for all --steps")
    p.add_argument("--out", metavar="DIR", help="output directory (default: "
                   "runs/<task>-T<T>-<model>-<date>-<time>)")
    p.add_argument("--progress", choices=["auto", "bar", "log", "none"], default="auto",
                   help="progress bar on a terminal, log lines otherwise (default: auto)")
