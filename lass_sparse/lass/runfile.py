"""A run folder's ``run.json``: its name and its one validating reader (used by the pipeline,
the runtime and the CLI alike)."""

from __future__ import annotations

import json
import os

RUN_JSON = "run.json"


class RunError(ValueError):
    """A user error about a run folder or its files (one line: which file, what to do)."""


def read_run_json(run_dir: str) -> dict:
    """``RUN/run.json``, validated: a corrupt file or a field of the wrong type is a
    :class:`RunError` naming the file and what to do (a missing one: FileNotFoundError)."""
    path = os.path.join(run_dir, RUN_JSON)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{run_dir} is not a run folder (no {RUN_JSON}); start one with "
                                f"`lass-sparse train --run {run_dir}`")
    fix = f"restore it, or start a new --run (delete {run_dir} to start this one over)"
    try:
        with open(path, encoding="utf-8") as f:
            info = json.load(f)
    except (ValueError, RecursionError) as e:
        raise RunError(f"run file {path} is corrupt (not JSON: {' '.join(str(e).split())}); "
                       f"{fix}") from None
    need = {"corpus": str, "pairs": list, "model": dict, "tokenizer": str}
    if not isinstance(info, dict):
        raise RunError(f"run file {path} is not a run description; {fix}")
    for key, typ in need.items():
        if not isinstance(info.get(key), typ):
            raise RunError(f"run file {path}: field {key!r} is missing or not a "
                           f"{typ.__name__}; {fix}")
    return info
