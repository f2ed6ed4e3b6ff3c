"""Progress of a training run: a tqdm or rich bar on a terminal (a built-in
one without them), plain log lines otherwise, or nothing.
"""
import shutil
import sys
import time


class _LogLines:
    """Not a terminal: no bar; the log lines only."""

    def __init__(self, total, initial, desc, stream):
        self.stream = stream

    def update(self, i, stats):
        pass

    def write(self, line):
        print(line, file=self.stream, flush=True)

    def close(self):
        pass


class _TextBar(_LogLines):
    """A minimal built-in progress bar (when neither tqdm nor rich imports)."""

    def __init__(self, total, initial, desc, stream):
        super().__init__(total, initial, desc, stream)
        self.total, self.desc, self.last, self.line = total, desc, 0.0, ""

    def update(self, i, stats):
        now = time.perf_counter()
        if now - self.last < 0.1 and i < self.total:
            return
        self.last = now
        width = shutil.get_terminal_size((100, 20)).columns
        frac = i / self.total
        n = 20
        bar = "#" * int(frac * n) + "-" * (n - int(frac * n))
        line = f"{self.desc} [{bar}] {i}/{self.total} {stats}"[:width - 1]
        self.stream.write("\r" + line.ljust(len(self.line)))
        self.stream.flush()
        self.line = line

    def write(self, line):
        self.stream.write("\r" + " " * len(self.line) + "\r" + line + "\n")
        self.stream.write(self.line)
        self.stream.flush()

    def close(self):
        if self.line:
            self.stream.write("\n")
            self.stream.flush()


class _TqdmBar(_LogLines):
    def __init__(self, total, initial, desc, stream):
        from tqdm import tqdm
        self.stream = stream
        self.bar = tqdm(total=total, initial=initial, desc=desc, unit="step",
                        dynamic_ncols=True, file=stream, leave=True)
        self.last = 0.0

    def update(self, i, stats):
        self.bar.update(i - self.bar.n)
        now = time.perf_counter()
        if now - self.last >= 0.1:
            self.last = now
            self.bar.set_postfix_str(stats, refresh=False)

    def write(self, line):
        self.bar.write(line, file=self.stream)

    def close(self):
        self.bar.close()


class _RichBar(_LogLines):
    def __init__(self, total, initial, desc, stream):
        from rich.console import Console
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                   TimeElapsedColumn)
        self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                                 MofNCompleteColumn(), TimeElapsedColumn(),
                                 TextColumn("{task.fields[stats]}"),
                                 console=Console(file=stream))
        self.progress.start()
        self.task = self.progress.add_task(desc, total=total, completed=initial, stats="")

    def update(self, i, stats):
        self.progress.update(self.task, completed=i, stats=stats)

    def write(self, line):
        self.progress.console.print(line, markup=False, highlight=False)

    def close(self):
        self.progress.stop()


def make_progress(kind, total, initial, desc, stream=None):
    """kind: "auto" (a bar on a terminal, log lines otherwise), "bar", "log", "none"."""
    stream = sys.stdout if stream is None else stream
    if kind == "none":
        return _Quiet(total, initial, desc, stream)
    if kind == "log" or (kind == "auto" and not _isatty(stream)):
        return _LogLines(total, initial, desc, stream)
    for cls, module in ((_TqdmBar, "tqdm"), (_RichBar, "rich")):
        try:
            __import__(module)
        except ImportError:
            continue
        return cls(total, initial, desc, stream)
    return _TextBar(total, initial, desc, stream)


class _Quiet(_LogLines):
    def write(self, line):
        pass


def _isatty(stream):
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
