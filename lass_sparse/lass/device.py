"""Where the pipeline runs: ``--device auto|cpu|cuda|cuda:N`` and ``--amp auto|none|bf16|fp16``."""

from __future__ import annotations

import torch
from torch import nn

DEVICE_HELP = "auto (CUDA when available), cpu, cuda or cuda:N"
AMPS = ("auto", "none", "bf16", "fp16")


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """``auto`` → ``cuda`` when torch sees a GPU, else ``cpu``; ``cuda[:N]`` is checked here so a
    wrong index fails before any work, with the devices that exist."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise ValueError(f"--device: expected {DEVICE_HELP}, got {spec!r}") from None
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type != "cuda":
        raise ValueError(f"--device: expected {DEVICE_HELP}, got {spec!r}")
    if not torch.cuda.is_available():
        raise ValueError(f"--device {spec}: torch sees no CUDA GPU (torch {torch.__version__}, "
                         f"CUDA build: {torch.version.cuda or 'no'}); use --device cpu")
    n = torch.cuda.device_count()
    if dev.index is not None and dev.index >= n:
        raise ValueError(f"--device {spec}: only {n} CUDA device(s) (cuda:0..cuda:{n - 1})")
    return dev


def resolve_amp(amp: str, device: torch.device) -> str:
    """``auto`` → bf16 autocast on a GPU that has bf16 (fp16 on one without), none on a CPU."""
    if amp not in AMPS:
        raise ValueError(f"--amp: expected one of {', '.join(AMPS)}, got {amp!r}")
    if amp != "auto":
        if amp == "fp16" and device.type != "cuda":
            raise ValueError("--amp fp16 needs a CUDA device (a grad scaler on a GPU); use bf16 "
                             "on a CPU")
        return amp
    if device.type != "cuda":
        return "none"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")
