"""`mpiexec -n N fastrnn train ...`: the command line trains data-parallel.

Every rank parses the same command line and draws every global batch of B
rows from the one seeded stream, then trains on its own rows (rank r of N:
rows [r*B//N, (r+1)*B//N)) through ``TrainStep(comm=)``; so N ranks make the
same run as one process with batch B, up to the rounding of the summed
gradients. Evaluation runs on every rank (the models are equal, so every
rank takes the same decision to stop); a stateful task's carried state is
split the same way and gathered for the checkpoint, which therefore holds
nothing that depends on N: ``--resume`` works with another number of ranks.

Only rank 0 prints and writes into the run directory (metrics, checkpoint,
picture, summary). The other ranks write into a scratch directory of their
own, removed at the end, and print nothing; with ``--resume`` rank 0 reads
the checkpoint and sends its bytes to the others, so the ranks need no
shared file system. An exception on any rank aborts every rank
(MPI_Abort) instead of leaving them waiting; Ctrl-C does too (the last
checkpoint stays), as ranks cannot agree on the step to stop at.

The launcher is recognised by the environment it gives its processes
(PMI_SIZE: MPICH, Intel MPI; OMPI_COMM_WORLD_SIZE: Open MPI).
"""
import os
import shutil
import sys
import tempfile
import traceback

_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
_active = None


def world_size():
    """How many ranks the launcher started (1 without one)."""
    for k in _SIZE_VARS:
        try:
            return max(1, int(os.environ[k]))
        except (KeyError, ValueError):
            continue
    return 1


def active():
    """The Parallel of this `fastrnn train` under mpiexec, or None."""
    return _active


class Parallel:
    """This rank's part of a data-parallel `fastrnn train`."""

    def __init__(self, comm):
        self.comm = comm
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()
        self.root = self.rank == 0

    def attach(self, ts, cfg):
        """TrainStep ts made data-parallel (rank 0's state everywhere)."""
        from . import _dist
        from .cli import UsageError
        if cfg["batch"] < self.size:
            raise UsageError(f"--batch: {cfg['batch']} rows cannot be split over "
                             f"{self.size} ranks; expected at least {self.size}")
        try:
            return _dist.attach(ts, self.comm)
        except (ValueError, TypeError) as e:
            raise UsageError(str(e)) from None

    def _rows(self, B):
        return slice(B * self.rank // self.size, B * (self.rank + 1) // self.size)

    def local_batch(self, task, x, y):
        """This rank's rows of a global batch (time-major x; y (T, B) for a
        target at every step, else (B,) or (B, O))."""
        s = self._rows(x.shape[1])
        return x[:, s], (y[:, s] if task.readout == "all" else y[s])

    def local_state(self, hx):
        """This rank's rows of a global carried state ((L*D, B, H) arrays)."""
        if hx is None:
            return None
        if isinstance(hx, tuple):
            return tuple(a[:, self._rows(a.shape[1])] for a in hx)
        return hx[:, self._rows(hx.shape[1])]

    def global_state(self, hx):
        """The ranks' carried states joined in rank order (collective)."""
        import numpy as np
        parts = self.comm.allgather(hx)
        if any(p is None for p in parts):
            return None
        if isinstance(hx, tuple):
            return tuple(np.concatenate([p[j] for p in parts], axis=1)
                         for j in range(len(hx)))
        return np.concatenate(parts, axis=1)


def _share_checkpoint(par, args, scratch):
    """--resume: rank 0 reads the checkpoint, every other rank gets its bytes
    in scratch and resumes from there."""
    from .cli import CHECKPOINT
    data = None
    if par.root:
        path = args.resume
        path = os.path.join(path, CHECKPOINT) if os.path.isdir(path) else path
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError:
            data = None          # rank 0 reports the missing file itself
    data = par.comm.bcast(data, root=0)
    if not par.root:
        if data is not None:
            with open(os.path.join(scratch, CHECKPOINT), "wb") as f:
                f.write(data)
        args.resume = scratch
        args.out = None


def run(parser, args):
    """cli.main's dispatch when a launcher started more than one rank."""
    global _active
    name = f"fastrnn {args.command}"
    if args.command != "train":
        parser.exit(2, f"{name}: error: only `fastrnn train` runs data-parallel under "
                       f"mpiexec ({world_size()} ranks); run `{name}` as one process\n")
    try:
        from mpi4py import MPI
    except ImportError:
        parser.exit(2, f"{name}: error: running under mpiexec with {world_size()} "
                       "ranks needs mpi4py: pip install 'fastrnn[mpi]'\n")
    from .cli import UsageError
    par = Parallel(MPI.COMM_WORLD)
    scratch = stdout = None
    if not par.root:
        scratch = tempfile.mkdtemp(prefix=f"fastrnn-rank{par.rank}-")
        stdout, sys.stdout = sys.stdout, open(os.devnull, "w")
        if args.resume:
            _share_checkpoint(par, args, scratch)
        else:
            args.out = scratch
    elif args.resume:
        _share_checkpoint(par, args, None)
    _active = par
    try:
        # usage errors come from the command line and the checkpoint, the
        # same on every rank: every rank stops with it, none is left waiting
        return args.func(args)
    except UsageError as e:
        if par.root:
            parser.exit(2, f"{name}: error: {e}\n")
        raise SystemExit(2) from None
    except BaseException as e:
        if not isinstance(e, KeyboardInterrupt):
            traceback.print_exc()
        what = "interrupted" if isinstance(e, KeyboardInterrupt) else type(e).__name__
        if scratch is not None:             # MPI_Abort ends the process here
            shutil.rmtree(scratch, ignore_errors=True)
        sys.stderr.write(f"{name}: rank {par.rank} of {par.size} stopped ({what}); "
                         "aborting every rank (MPI_Abort); the run directory keeps "
                         "the last checkpoint\n")
        sys.stderr.flush()
        par.comm.Abort(1)
    finally:
        _active = None
        if stdout is not None:
            sys.stdout.close()
            sys.stdout = stdout
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
