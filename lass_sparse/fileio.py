"""Crash-safe file writes: :func:`atomic_write` and the cleanup of temp files that killed writes
left behind (:func:`remove_stale_temp_files`). Standard library only."""

from __future__ import annotations

import os
import re
import tempfile
import time
import zlib

_TMP_RE = re.compile(r"^\.tmp-(\d+)@([0-9a-f]{8})-[a-z0-9_]+\.")
_OLD_TMP_AGE = 3600.0  # seconds: a temp file whose writer cannot be checked is stale after 1 h


def _host_tag() -> str:
    import socket

    return f"{zlib.crc32(socket.gethostname().encode()):08x}"


def _tmp_prefix(pid: int | None = None) -> str:
    """``.tmp-<pid>@<host>-``: lets a later write tell a killed writer's leftovers (same host,
    pid gone) from a live writer's file (another host sharing the folder: by age only)."""
    return f".tmp-{os.getpid() if pid is None else pid}@{_host_tag()}-"


def _umask() -> int:
    try:  # Linux: read it without changing it (os.umask is process-wide, not thread-safe)
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: exists, owned by someone else
        return True
    return True


def remove_stale_temp_files(folder: str) -> list[str]:
    """Delete the ``.tmp-*`` files in ``folder`` that :func:`atomic_write` calls killed mid-write
    left behind: those whose writer process (on this host) is gone; those of other hosts or
    without a pid (older versions) when older than an hour. Returns the removed paths."""
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    now = time.time()
    host = _host_tag()
    for name in names:
        if not name.startswith(".tmp-"):
            continue
        path = os.path.join(folder, name)
        m = _TMP_RE.match(name)
        try:
            if m is not None and m.group(2) == host:
                stale = not _pid_alive(int(m.group(1)))
            else:
                stale = now - os.stat(path).st_mtime > _OLD_TMP_AGE
            if stale and os.path.isfile(path):
                os.unlink(path)
                removed.append(path)
        except OSError:
            continue  # raced with another cleaner or the writer itself
    return removed


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return  # platforms that cannot open a directory (Windows)
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same folder and a rename: a crash leaves
    either the old file or the new one, never half of one. The file gets the mode the umask
    gives a new file (``0o666 & ~umask``); the folder is fsynced after the rename so the rename
    itself survives a power loss; temp files of earlier killed writes are removed."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    remove_stale_temp_files(folder)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=_tmp_prefix(),
                               suffix="." + os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            if hasattr(os, "fchmod"):
                os.fchmod(f.fileno(), 0o666 & ~_umask())
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(folder)


__all__ = ["atomic_write", "remove_stale_temp_files"]
