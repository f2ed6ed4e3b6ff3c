"""How a command fails: the two exceptions a subcommand raises for a bad
command line (UsageError, exit 2) or a run that cannot go on (RunError, exit
1), the one-line messages `main` prints for them and for filesystem errors,
and warnings on standard error.
"""
import os
import sys


class UsageError(Exception):
    """A bad combination of options: reported as `fastrnn CMD: error: ...`, exit 2."""


class RunError(Exception):
    """A run that cannot go on (every step skipped, ...): reported as
    `fastrnn CMD: error: ...`, exit 1 (as are filesystem errors)."""


def _warn(line):
    print(f"warning: {line}", file=sys.stderr, flush=True)


def _os_message(e):
    """One line for a filesystem error: 'PATH: No space left on device'."""
    what = e.strerror or str(e) or type(e).__name__
    if e.filename is not None:
        where = os.fspath(e.filename)
        if e.filename2 is not None:
            where += f" -> {os.fspath(e.filename2)}"
        return f"{where}: {what}"
    return what


def _exit(code, command, message):
    message = " ".join(message.split("\n"))
    sys.stderr.write(f"fastrnn {command}: error: {message}\n")
    sys.stderr.flush()
    raise SystemExit(code)
