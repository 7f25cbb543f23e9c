"""Checkpoints: model and optimizer tensors in safetensors, the rest (config, step, RNG) in JSON.

Crash-safe: tensors go to step-numbered files first, ``state.json`` (written atomically, last)
names them, then older files are removed — a SIGKILL at any point leaves a loadable checkpoint.
"""

from __future__ import annotations

import base64
import json
import os
import random

import torch
from safetensors.torch import load_file, save

from ..fileio import atomic_write

STATE = "state.json"


def _flatten_optim(sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, meta = {}, {"param_groups": sd["param_groups"], "state": {}}
    for idx, st in sd["state"].items():
        meta["state"][str(idx)] = {}
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{idx}.{k}"] = v.detach().cpu().contiguous()
            else:
                meta["state"][str(idx)][k] = v
    return tensors, meta


def _unflatten_optim(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict = {int(i): dict(s) for i, s in meta["state"].items()}
    for key, t in tensors.items():
        i, k = key.split(".", 1)
        state.setdefault(int(i), {})[k] = t
    return {"state": state, "param_groups": meta["param_groups"]}


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.numpy().tobytes()).decode()


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)


def rng_state() -> dict:
    out = {"torch": _b64(torch.get_rng_state()), "python": repr(random.getstate())}
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # dropout on a GPU
        out["cuda"] = [_b64(t) for t in torch.cuda.get_rng_state_all()]
    return out


def set_rng_state(s: dict) -> None:
    import ast

    torch.set_rng_state(_unb64(s["torch"]))
    random.setstate(ast.literal_eval(s["python"]))
    cuda = s.get("cuda")
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([_unb64(c) for c in cuda])


def save_checkpoint(folder: str, model: torch.nn.Module | None, optimizer, state: dict, *,
                    model_state: dict | None = None, optim_state: dict | None = None) -> None:
    """Write model + optimizer + ``state`` (JSON-able) for ``state["step"]``; tensors are saved
    from the CPU, so a checkpoint loads on any device. ``model_state`` / ``optim_state``: full
    state dicts gathered by the caller (sharded training) instead of the objects' own."""
    os.makedirs(folder, exist_ok=True)
    step = int(state["step"])
    mfile, ofile = f"model-{step:08d}.safetensors", f"optim-{step:08d}.safetensors"
    msd = model.state_dict() if model_state is None else model_state
    atomic_write(os.path.join(folder, mfile),
                 save({k: v.detach().cpu().contiguous() for k, v in msd.items()}))
    meta = None
    if optimizer is not None or optim_state is not None:
        tensors, meta = _flatten_optim(optimizer.state_dict() if optim_state is None
                                       else optim_state)
        atomic_write(os.path.join(folder, ofile), save(tensors))
    full = dict(state, model_file=mfile, optim_file=ofile if meta is not None else None,
                optim_meta=meta, rng=rng_state())
    atomic_write(os.path.join(folder, STATE), json.dumps(full, indent=1).encode())
    for f in os.listdir(folder):  # older step files are now unreferenced
        if f.endswith(".safetensors") and f not in (mfile, ofile):
            os.unlink(os.path.join(folder, f))


def has_checkpoint(folder: str) -> bool:
    return os.path.exists(os.path.join(folder, STATE))


class CheckpointError(ValueError):
    """A checkpoint file that is missing, truncated or corrupt (names the file and what to do)."""


def _fix(folder: str) -> str:
    return (f"restore the file, or delete {folder} to run that stage again from its start "
            "(or from its other checkpoint)")


def read_state(folder: str) -> dict:
    path = os.path.join(folder, STATE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint in {folder} (missing {STATE})")
    try:
        with open(path, encoding="utf-8") as f:
            state = json.load(f)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError
        raise CheckpointError(f"checkpoint state {path} is corrupt (not JSON: "
                              f"{' '.join(str(e).split())}); {_fix(folder)}") from None
    if not isinstance(state, dict) or not isinstance(state.get("model_file"), str) or not (
        isinstance(state.get("step"), int)
    ):
        raise CheckpointError(f"checkpoint state {path} is not a checkpoint's state (needs "
                              f"'step' and 'model_file'); {_fix(folder)}")
    for key in ("model_file", "optim_file"):  # names only: never a path out of the folder
        name = state.get(key)
        if name is not None and (not isinstance(name, str) or os.path.basename(name) != name):
            raise CheckpointError(f"checkpoint state {path}: {key} {name!r} is not a file name "
                                  f"in {folder}; {_fix(folder)}")
    return state


def _load_tensors(folder: str, name: str) -> dict[str, torch.Tensor]:
    path = os.path.join(folder, name)
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint file {path} is missing ({STATE} names it); "
                              f"{_fix(folder)}")
    try:
        return load_file(path)
    except Exception as e:  # safetensors' own error type: header too large, truncated, ...
        raise CheckpointError(f"checkpoint file {path} is corrupt or truncated "
                              f"({' '.join(str(e).split())}); {_fix(folder)}") from None


def load_optimizer_state(folder: str) -> dict | None:
    """The optimizer state dict a checkpoint holds (tensors on the CPU), or None."""
    state = read_state(folder)
    if not state.get("optim_file"):
        return None
    tensors = _load_tensors(folder, state["optim_file"])
    try:
        return _unflatten_optim(tensors, state["optim_meta"])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"checkpoint state {os.path.join(folder, STATE)} has a corrupt "
                              f"optimizer entry ({e!r}); {_fix(folder)}") from None


def load_checkpoint(folder: str, model: torch.nn.Module, optimizer=None,
                    restore_rng: bool = False) -> dict:
    """Load what :func:`save_checkpoint` wrote into ``model`` (and ``optimizer``); returns the
    state dict. A missing, truncated or corrupt file raises :class:`CheckpointError` (a
    ValueError) naming it."""
    state = read_state(folder)
    sd = _load_tensors(folder, state["model_file"])
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint {folder} does not fit the model: missing {missing[:4]}, "
                         f"unexpected {unexpected[:4]}")
    if optimizer is not None and state.get("optim_file"):
        tensors = _load_tensors(folder, state["optim_file"])
        try:
            optim_sd = _unflatten_optim(tensors, state["optim_meta"])
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise CheckpointError(f"checkpoint state {os.path.join(folder, STATE)} has a "
                                  f"corrupt optimizer entry ({e!r}); {_fix(folder)}") from None
        optimizer.load_state_dict(optim_sd)
    if restore_rng:
        try:
            set_rng_state(state["rng"])
        except (KeyError, TypeError, ValueError, SyntaxError, RuntimeError) as e:
            raise CheckpointError(f"checkpoint state {os.path.join(folder, STATE)} has a "
                                  f"corrupt RNG entry ({type(e).__name__}); "
                                  f"{_fix(folder)}") from None
    return state
