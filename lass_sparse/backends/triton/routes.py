"""Measured routes: which Triton kernel variant each GEMM-shaped op runs, per GPU model and row
count, from a device-time sweep on that GPU (``routes.json`` beside this file, written by
``tools/routes_from_sweep.py`` from ``make gpu-session``'s ``device.json``).

A GPU without an entry runs the default variant, ``v1`` (kernels.py).
``$LASS_SPARSE_TRITON_VARIANT`` overrides the table for every op; ``LASS_SPARSE_TRITON_ROUTES=0``
ignores it.

``routes.json``::

    {"<torch.cuda.get_device_name()>": {
        "source": "<the sweep: file, commit, date>",
        "routes": {"<op>": [[max_rows, "<variant>"], ..., [null, "<variant>"]], ...}}}

An op's list is read in order: the first entry whose ``max_rows`` is null or >= the call's rows
(M; the rows per segment for the segmented ops) names the variant.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import torch

ROUTES_FILE = Path(__file__).with_name("routes.json")
ENV = "LASS_SPARSE_TRITON_ROUTES"
DEFAULT = "v1"
# the variants each routed op may take (kernels_wt.py implements them; v1 is kernels.py)
OPS: dict[str, tuple[str, ...]] = {
    "masked_linear": ("v1", "wt", "wt_persistent", "wt_tma"),
    "masked_linear_dx": ("v1", "wt"),
    "masked_linear_dw": ("v1", "wt"),  # masked_linear_dw_accumulate_ too
    "segmented_masked_linear": ("v1", "wt"),
    "segmented_masked_linear_dx": ("v1", "wt"),
    "segmented_masked_linear_dw": ("v1", "wt"),
}


def validate(table: object, where: str = "routes") -> dict:
    """``table`` if it has the layout above (known ops and variants, max_rows ascending, a
    final null entry), else ValueError naming what is wrong."""
    if not isinstance(table, dict):
        raise ValueError(f"{where}: expected an object of GPU names, got {type(table).__name__}")
    for gpu, entry in table.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("routes"), dict):
            raise ValueError(f"{where}[{gpu!r}]: expected {{'source': ..., 'routes': {{...}}}}")
        for op, steps in entry["routes"].items():
            at = f"{where}[{gpu!r}].routes[{op!r}]"
            if op not in OPS:
                raise ValueError(f"{at}: unknown op; expected one of {', '.join(OPS)}")
            if not isinstance(steps, list) or not steps:
                raise ValueError(f"{at}: expected a non-empty list of [max_rows, variant]")
            last = 0
            for i, step in enumerate(steps):
                ok = isinstance(step, list) and len(step) == 2
                bound, var = step if ok else (None, None)
                if not ok or var not in OPS[op]:
                    raise ValueError(f"{at}[{i}]: expected [max_rows, one of {OPS[op]}], "
                                     f"got {step!r}")
                final = i == len(steps) - 1
                if final != (bound is None) or (bound is not None and (
                        not isinstance(bound, int) or isinstance(bound, bool)
                        or bound <= last)):
                    raise ValueError(f"{at}[{i}]: max_rows must be ascending ints and null only "
                                     f"in the last entry, got {bound!r}")
                last = bound or last
    return table


@functools.cache
def table() -> dict:
    """The packaged table (empty without the file)."""
    if not ROUTES_FILE.exists():
        return {}
    with open(ROUTES_FILE) as f:
        return validate(json.load(f), str(ROUTES_FILE.name))


@functools.cache
def _device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def for_device(device: torch.device) -> dict | None:
    """The routes of ``device``'s GPU model, or None (not a CUDA device, no entry, or off)."""
    if device.type != "cuda" or os.environ.get(ENV) == "0":
        return None
    tab = table()
    if not tab:
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    entry = tab.get(_device_name(index))
    return None if entry is None else entry["routes"]


def choose(op: str, rows: int, device: torch.device) -> str:
    """The variant ``op`` runs for ``rows`` rows on ``device`` (``DEFAULT`` without a route)."""
    routes = for_device(device)
    steps = None if routes is None else routes.get(op)
    if not steps:
        return DEFAULT
    for bound, var in steps:
        if bound is None or rows <= bound:
            return var
    return DEFAULT
