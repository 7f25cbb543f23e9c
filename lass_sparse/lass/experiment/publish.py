"""Publish an experiment's models: a small run folder (bf16 best checkpoints, the compact mask
bank, the SentencePiece model, run.json) that ``evaluate``, ``translate`` and ``serve`` open."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

from ...fileio import atomic_write


def publish(run_dir: str, out_dir: str, systems: dict[str, str], masks: str) -> dict:
    """Copy ``systems`` (published name -> stage; each its best checkpoint, else its last) as
    bf16 safetensors, the bank ``masks`` (compact) as ``masks.safetensors``, the tokenizer and
    run.json (corpus ``demo``: scoring ``--test`` files needs no training corpus) into
    ``out_dir``; returns ``{file: sha256}``."""
    import torch
    from safetensors.torch import load_file, save

    from ...masks import MaskBank
    from ..checkpoint import read_state

    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(run_dir, "run.json")) as f:
        info = json.load(f)
    info["corpus"] = "demo"
    atomic_write(os.path.join(out_dir, "run.json"), json.dumps(info, indent=1).encode())
    shutil.copyfile(os.path.join(run_dir, info["tokenizer"]),
                    os.path.join(out_dir, info["tokenizer"]))
    for name, stage in systems.items():
        src = os.path.join(run_dir, stage, "best")
        if not os.path.exists(os.path.join(src, "state.json")):
            src = os.path.join(run_dir, stage, "ckpt")
        if not os.path.exists(os.path.join(src, "state.json")):
            raise FileNotFoundError(f"publish: stage {stage!r} has no checkpoint in {run_dir}")
        st = read_state(src)
        sd = load_file(os.path.join(src, st["model_file"]))
        ck = os.path.join(out_dir, name, "ckpt")
        os.makedirs(ck, exist_ok=True)
        atomic_write(os.path.join(ck, "model.safetensors"),
                     save({k: t.to(torch.bfloat16).contiguous() for k, t in sd.items()}))
        atomic_write(os.path.join(ck, "state.json"), json.dumps(
            {"step": st["step"], "model_file": "model.safetensors", "optim_file": None,
             "from": f"{stage}/{os.path.basename(src)}", "dtype": "bfloat16"}).encode())
    MaskBank.load(os.path.join(run_dir, masks)).save(os.path.join(out_dir, "masks.safetensors"),
                                                     compact=True)
    sums = {}
    for root, _, files in os.walk(out_dir):
        for f in sorted(files):
            path = os.path.join(root, f)
            with open(path, "rb") as fh:
                sums[os.path.relpath(path, out_dir)] = hashlib.sha256(fh.read()).hexdigest()
    return sums
