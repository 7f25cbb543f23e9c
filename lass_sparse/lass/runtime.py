"""Where and how a pipeline process runs: device, rank, process group, run folders.

One module for the CLI, the experiment driver and Python callers alike:

- :func:`device_for` — ``auto|cpu|cuda|cuda:N``; under a multi-process launch a bare ``cuda``
  means this rank's GPU (``cuda:$LOCAL_RANK``).
- :func:`world_size` / :func:`init_process_group` — join the launch's process group (NCCL on
  GPUs, else gloo) with a timeout long enough for ranks that wait while another trains;
  :func:`leave_process_group` destroys it when the command ends.
- :func:`launch` — start ``N`` ranks of a ``lass-sparse`` command through
  ``torch.distributed.run``'s API (``--nproc-per-node N``), without torchrun's own parser in the
  way of ours.
- :func:`read_run_json` (from :mod:`.runfile`) / :func:`open_checked` — a run folder's
  ``run.json`` validated field by field, the corpus files checked, errors as one line naming the
  file (:class:`RunError`).
"""

from __future__ import annotations

import datetime
import os
import sys

import torch

from .device import resolve_device
from .runfile import RUN_JSON, RunError, read_run_json  # noqa: F401 (part of this module's API)

# A rank may wait at a barrier while another trains a whole stage: hours, not gloo's 30 min.
PROCESS_GROUP_TIMEOUT = datetime.timedelta(hours=48)
_joined = False  # init_process_group made the group (leave_process_group destroys only that)


def world_size() -> int:
    """Processes of this launch (``$WORLD_SIZE``; 1 outside a multi-process launch)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1") or 1)
    except ValueError:
        raise RunError(f"$WORLD_SIZE must be an integer, got {os.environ['WORLD_SIZE']!r}") \
            from None


def device_for(spec: str | torch.device | None = "auto") -> torch.device:
    """The device of this process: ``spec`` resolved; a bare ``cuda`` under a multi-process
    launch is this rank's GPU."""
    dev = resolve_device(spec or "auto")
    local = os.environ.get("LOCAL_RANK")
    if dev.type == "cuda" and dev.index is None and local is not None and world_size() > 1:
        dev = resolve_device(f"cuda:{int(local)}")
    return dev


def init_process_group(device: str | torch.device | None = "auto") -> tuple[int, int]:
    """Join the launch's process group once (NCCL on GPUs, gloo otherwise) and return
    ``(world, rank)``; ``(1, 0)`` outside a multi-process launch."""
    import torch.distributed as dist

    global _joined
    if world_size() <= 1:
        return 1, 0
    if not dist.is_initialized():
        dev = device_for(device)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo",
                                timeout=PROCESS_GROUP_TIMEOUT)
        _joined = True
    return dist.get_world_size(), dist.get_rank()


def barrier() -> None:
    """Wait for every rank (a no-op in one process)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def leave_process_group(ok: bool = True) -> None:
    """Destroy the process group :func:`init_process_group` joined (a no-op for none, or for
    a group the caller made itself): after a barrier when
    the command succeeded, so no rank closes its connections while another still uses them;
    at once after an error (the other ranks may never reach a barrier). Torch warns, and gloo
    can abort at interpreter exit, when a process exits with its group alive."""
    import torch.distributed as dist

    global _joined
    if not (_joined and dist.is_available() and dist.is_initialized()):
        return
    _joined = False
    try:
        if ok:
            dist.barrier()
    finally:
        dist.destroy_process_group()


def claimed(key: str, n: int, world: int, rank: int):
    """Indices ``0..n-1`` this rank should run: a shared work queue (every rank takes the next
    unclaimed index from an atomic counter in the process group's store, so a rank that
    finishes early takes more), else the static split ``rank::world``."""
    import torch.distributed as dist

    store = None
    if world > 1 and dist.is_available() and dist.is_initialized():
        try:
            store = dist.distributed_c10d._get_default_store()
        except (AttributeError, RuntimeError):  # private API: keep the static split
            pass
    if store is None:
        yield from range(rank, n, world)
        return
    while (i := store.add(f"lass_sparse/queue/{key}", 1) - 1) < n:
        yield i


def launch(nproc: int, argv: list[str], module: str = "lass_sparse.cli") -> int:
    """Run ``python -m MODULE ARGV`` as ``nproc`` ranks of one standalone job (torchrun's API,
    one node, a free port); returns the exit code (that of the first failed rank)."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    if nproc < 1:
        raise ValueError(f"--nproc-per-node must be >= 1, got {nproc}")
    # `--` ends torchrun's options: ours (e.g. --run) are never taken for its (--run-path)
    args = torchrun.parse_args(["--standalone", f"--nproc-per-node={nproc}",
                                "--max-restarts=0", "-m", module, "--", *argv])
    try:
        torchrun.run(args)
    except ChildFailedError as e:
        codes = [f.exitcode for f in e.failures.values()] or [1]
        print(f"lass-sparse: error: rank(s) {sorted(e.failures)} failed (exit codes {codes}); "
              "their output is above", file=sys.stderr)
        return next((c for c in codes if c), 1)
    except SignalException as e:  # SIGTERM/SIGHUP to the launcher: the ranks are stopped
        print(f"lass-sparse: stopped by signal {e.sigval.name}; rerun the same command to "
              "resume", file=sys.stderr)
        return 128 + int(e.sigval)
    return 0


def _check_gzip_files(folder: str) -> None:
    """Every ``*.gz`` of a corpus folder starts like a gzip file (else: which file is not)."""
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return  # missing folder: the corpus reader says so
    for name in names:
        if not name.endswith(".gz"):
            continue
        path = os.path.join(folder, name)
        try:
            with open(path, "rb") as f:
                head = f.read(2)
        except OSError as e:
            raise RunError(f"corpus file {path} cannot be read ({e.strerror})") from None
        if head != b"\x1f\x8b":
            raise RunError(f"corpus file {path} is not gzip-compressed; compress it "
                           f"(gzip {path[:-3]}) or rebuild the corpus")


def check_corpus(corpus: str | None) -> None:
    """A corpus folder's files are readable gzip files (``demo`` and None pass)."""
    if corpus not in (None, "demo"):
        _check_gzip_files(corpus)


def open_checked(run_dir: str, device: str | torch.device | None = "auto"):
    """:func:`~lass_sparse.lass.pipeline.open_run` after run.json and the corpus files are
    checked (one-line errors naming the file); joins the process group first under a launch."""
    from . import pipeline as P

    init_process_group(device)
    dev = device_for(device)
    check_corpus(read_run_json(run_dir)["corpus"])
    return P.open_run(run_dir, dev)


def create_or_open(run_dir: str, *, corpus: str | None = None, device="auto",
                   **prepare_kw):
    """Create the run (``corpus`` given, or no run.json yet) or reopen it; under a launch rank 0
    creates it (tokenizer, run.json) while the others wait, then they open it."""
    from . import pipeline as P

    world, rank = init_process_group(device)
    exists = os.path.exists(os.path.join(run_dir, RUN_JSON))

    def create():
        check_corpus(corpus)
        if exists:
            read_run_json(run_dir)
        return P.prepare(run_dir, corpus or "demo", device=device_for(device), **prepare_kw)

    if corpus is None and exists:
        return open_checked(run_dir, device)
    if world > 1:
        run = create() if rank == 0 else None
        barrier()
        return run if rank == 0 else open_checked(run_dir, device)
    return create()
