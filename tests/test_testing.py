"""lass_sparse.testing.run_process_group: a timed-out launcher takes its children with it."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from lass_sparse.testing import run_process_group

LAUNCHER = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
open(sys.argv[1], "w").write(str(child.pid))
print("started", flush=True)
time.sleep(120)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie (exited, not yet reaped by init) is gone
        return f.read().split(")")[-1].split()[0] != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_timeout_kills_the_launchers_children_too(tmp_path):
    pid_file = tmp_path / "child.pid"
    with pytest.raises(subprocess.TimeoutExpired):
        run_process_group([sys.executable, "-c", LAUNCHER, str(pid_file)], timeout=3)
    child = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(child)


def test_a_finished_command_returns_its_output_and_code():
    r = run_process_group([sys.executable, "-c", "import sys; print('out'); "
                           "print('err', file=sys.stderr); sys.exit(3)"], timeout=60)
    assert (r.returncode, r.stdout, r.stderr) == (3, "out\n", "err\n")
