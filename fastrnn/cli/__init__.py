"""The fastrnn command line (also: python -m fastrnn); ``main`` is the
console entry point (pyproject.toml: fastrnn = "fastrnn.cli:main").

One module per subcommand -- train, compare, sample, bench, backends, plot,
tune -- each with its ``cmd_*`` function and the ``add_parser`` that
registers its options; shared pieces: parser (the parser and the program's
description), options (options shared by train and compare), config (a
run's configuration, the model built from it), errors (UsageError, RunError
and the one-line messages), progress (bars and log lines), metrics (the run
directory and metrics.jsonl). Under mpiexec, ``main`` hands the command to
fastrnn/cli_mpi.py. The names below are re-exported for the tests and for
cli_mpi.
"""
import sys

from .. import cli_mpi as _mpi
from .bench import BENCH_SHAPES, cmd_bench
from .compare import COMPARE_DEFAULTS, VARIANTS, cmd_compare, compare_configs, compare_table
from .config import (DEFAULTS, OPTIMIZER_NAMES, RESUME_OVERRIDES, TASK_DEFAULTS, build,
                     default_out, describe, make_task, resolve_config, set_forget_bias)
from .errors import RunError, UsageError, _exit, _os_message
from .metrics import METRICS, gradient_flow_record, read_metrics, read_records
from .parser import make_parser
from .plot import PICTURE, cmd_plot, plot_compare, plot_run
from .progress import _LogLines, _TextBar, _TqdmBar, make_progress
from .sample import cmd_sample, sample_text
from .train import (CHECKPOINT, COMPILE_NOTICE_S, STOP_AFTER_SKIPPED,
                    WARN_SKIPPED_FRACTION, cmd_train, print_summary, train_run)

__all__ = [
    "BENCH_SHAPES", "CHECKPOINT", "COMPARE_DEFAULTS", "COMPILE_NOTICE_S", "DEFAULTS",
    "METRICS", "OPTIMIZER_NAMES", "PICTURE", "RESUME_OVERRIDES", "STOP_AFTER_SKIPPED",
    "TASK_DEFAULTS", "VARIANTS", "WARN_SKIPPED_FRACTION", "RunError", "UsageError",
    "_LogLines", "_TextBar", "_TqdmBar", "build", "cmd_bench", "cmd_compare", "cmd_plot",
    "cmd_sample", "cmd_train", "compare_configs", "compare_table", "default_out",
    "describe", "gradient_flow_record", "main", "make_parser", "make_progress",
    "make_task", "plot_compare", "plot_run", "print_summary", "read_metrics",
    "read_records", "resolve_config", "sample_text", "set_forget_bias", "train_run"]


def main(argv=None):
    parser = make_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.argv = argv
    if _mpi.world_size() > 1:
        return _mpi.run(parser, args)
    try:
        return args.func(args)
    except UsageError as e:
        _exit(2, args.command, str(e))
    except RunError as e:
        _exit(1, args.command, str(e))
    except OSError as e:
        _exit(1, args.command, _os_message(e))
