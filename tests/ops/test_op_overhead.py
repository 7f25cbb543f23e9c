"""tools/op_overhead.py (the per-call overhead table quoted in README) runs and writes its
table: every row a positive time."""

from __future__ import annotations

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_op_overhead_writes_a_row_per_call(tmp_path):
    out = tmp_path / "overhead.md"
    r = subprocess.run([sys.executable, os.path.join(REPO, "tools", "op_overhead.py"),
                        "--calls", "3", "--out", str(out)], capture_output=True, text=True,
                       timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [ln for ln in out.read_text().splitlines() if ln.startswith("| ") and "µs" not in ln]
    names = [ln.split("|")[1].strip() for ln in rows]
    assert {"F.linear", "torch.ops masked_linear", "masked_linear.registry (body route)",
            "torch.ops masked_adamw_ (4 tensors)"} <= set(names)
    assert all(float(ln.split("|")[2]) > 0 for ln in rows)
