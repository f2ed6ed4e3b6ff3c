"""The command-line parser: the program's description (the table of
subcommands shown by `fastrnn --help`), --version, and each subcommand's
options, registered by its own module's ``add_parser`` in the order --help
lists them.
"""
import argparse

from . import backends, bench, compare, plot, sample, train, tune

DESCRIPTION = """The fastrnn command line (also: python -m fastrnn).

  fastrnn train      train one model on a task; with no options: an LSTM with
                     gradient norm clipping on the adding problem, T=100
  fastrnn compare    tanh RNN / tanh RNN + orthogonal init + clipping / IRNN /
                     LSTM on one task, one budget, one seed: table and plot
  fastrnn sample     generate text from a character-model checkpoint
  fastrnn bench      a quick speed table: each backend, the NumPy reference,
                     PyTorch (when installed)
  fastrnn backends   which backends are available, and why not
  fastrnn plot       (re)draw the picture of a run directory
  fastrnn tune       plan the numba backend's kernels for this machine
"""


def make_parser():
    p = argparse.ArgumentParser(prog="fastrnn", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    from .. import __version__
    p.add_argument("--version", action="version", version=f"fastrnn {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for module in (train, compare, sample, bench, backends, plot, tune):
        module.add_parser(sub)
    return p
