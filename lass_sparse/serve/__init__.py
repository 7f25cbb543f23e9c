"""``lass-sparse serve``: one model, every direction, over HTTP (optional extra:
``pip install "lass_sparse[serve]"``).

- :mod:`~lass_sparse.serve.engine`: the model side — :class:`NativeEngine` (a LaSS run folder)
  and :class:`HFEngine` (a Hugging Face LaSS folder) run batches that mix directions.
- :mod:`~lass_sparse.serve.batcher`: the bounded queue and the cross-pair dynamic batcher.
- :mod:`~lass_sparse.serve.app`: the FastAPI app (``create_app``) and its limits
  (:class:`ServeConfig`).
- :mod:`~lass_sparse.serve.metrics`: Prometheus text exposition.
- :mod:`~lass_sparse.serve.commands`: the CLI.

See docs/serving.md.
"""

from __future__ import annotations

from .batcher import MODES, Batcher, Draining, Job, Overloaded
from .engine import Engine, HFEngine, NativeEngine, Source, TooLong, UnknownPair

__all__ = ["MODES", "Batcher", "Draining", "Engine", "HFEngine", "Job", "NativeEngine",
           "Overloaded", "ServeConfig", "Source", "TooLong", "UnknownPair", "create_app"]


def __getattr__(name: str):  # the app needs FastAPI: import it on first use
    if name in ("ServeConfig", "create_app"):
        from . import app

        return getattr(app, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
