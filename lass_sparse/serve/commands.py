"""``lass-sparse serve``: an HTTP translation server for every direction of one model.

::

    lass-sparse serve --run results/models --stage lass --masks masks.safetensors
    lass-sparse serve --hf-model lass_folder --port 8080 --threads 2

Binds 127.0.0.1 unless ``--host`` says otherwise. Prints one line
``lass-sparse serve: listening on http://HOST:PORT (...)`` on stdout when it is ready (``--port
0`` picks a free port). SIGINT/SIGTERM stop admissions, answer every request already in, then
exit 0.
"""

from __future__ import annotations

import argparse
import errno
import logging
import signal
import socket
from typing import Any

from ..cli import CommandError, nonneg_float, positive_int
from .batcher import MODES

DEFAULT_PORT = 8000
_DESCRIPTION = """\
HTTP translation server for every direction of one model (see docs/serving.md):
POST /v1/translate, GET /v1/pairs, /health, /metrics, /docs (OpenAPI), a page at /.

  lass-sparse serve --run results/models --stage lass --masks masks.safetensors
  lass-sparse serve --hf-model LASS_FOLDER --port 8080 --threads 2

Binds 127.0.0.1 unless --host says otherwise; prints "lass-sparse serve: listening on
http://HOST:PORT (...)" when ready (--port 0: a free port). SIGINT/SIGTERM: no new requests
(503), the queued ones run at once and are answered, then exit 0."""


def _bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (0: a free port), or a one-line error."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise CommandError(f"--host {host}: cannot resolve it ({e.strerror})", 2) from None
    family, kind, proto, _, addr = infos[0]
    # proto must say TCP (getaddrinfo's, not 0): asyncio sets TCP_NODELAY on the accepted
    # connections only then, and without it every response waits ~40 ms for a delayed ACK
    sock = socket.socket(family, kind, proto or socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        why = "already in use" if e.errno == errno.EADDRINUSE else e.strerror
        raise CommandError(f"--port {port}: cannot listen on {host}:{port} ({why})") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def build_engine(args: argparse.Namespace) -> Any:
    """The engine the command line asks for (``--run`` or ``--hf-model``)."""
    import torch

    from .engine import HFEngine, NativeEngine

    if args.threads:
        torch.set_num_threads(args.threads)
    zero_shot = not args.no_zero_shot
    if args.hf_model:
        for opt in ("stage", "masks"):
            if getattr(args, opt) is not None:
                raise CommandError(f"--{opt} goes with --run, not --hf-model", 2)
        return HFEngine(args.hf_model, device=args.device, zero_shot=zero_shot, pairs=args.pairs)
    return NativeEngine.from_run(args.run, args.stage or "joint", args.masks, device=args.device,
                                 zero_shot=zero_shot, pairs=args.pairs, lenpen=args.lenpen)


def cmd_serve(args: argparse.Namespace) -> int:
    from ..lass.device import resolve_device

    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ModuleNotFoundError as e:
        raise CommandError(f"`lass-sparse serve` needs the Python package {e.name!r}, which is "
                           'not installed: pip install "lass_sparse[serve]"', 2) from None
    from .app import ServeConfig, create_app

    resolve_device(args.device)  # a bad --device fails before loading anything
    try:
        cfg = ServeConfig(
            mode=args.batching, max_batch_tokens=args.max_batch_tokens,
            max_batch_sentences=args.max_batch_sentences, max_wait_ms=args.max_wait_ms,
            max_queue=args.max_queue, max_texts=args.max_texts,
            max_text_chars=args.max_text_chars, max_beam=args.max_beam, default_beam=args.beam,
            max_body_bytes=args.max_body_bytes, request_timeout_s=args.request_timeout)
    except ValueError as e:
        msg = str(e)
        for field, opt in _OPTION_OF.items():
            msg = msg.replace(field, opt)
        raise CommandError(msg, 2) from None
    sock = _bind(args.host, args.port)  # before loading: a taken port fails fast
    engine = build_engine(args)
    app = create_app(engine, cfg)
    host, port = sock.getsockname()[:2]
    batcher = app.state.batcher
    ready = (f"lass-sparse serve: listening on http://{f'[{host}]' if ':' in host else host}:"
             f"{port} ({len(engine.pairs)} directions: {len(engine.supervised)} supervised, "
             f"{len(engine.zero_shot)} zero-shot; {engine.kind} on {engine.device}; batching "
             f"{cfg.mode})")

    class Server(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets)
            if self.started:
                print(ready, flush=True)

        def handle_exit(self, sig: int, frame: Any) -> None:
            batcher.begin_drain()  # what is queued runs now; new requests get 503
            super().handle_exit(sig, frame)

    logging.getLogger("lass_sparse.serve").setLevel(args.log_level.upper())
    config = uvicorn.Config(app, log_level=args.log_level, access_log=args.access_log,
                            timeout_graceful_shutdown=args.shutdown_timeout, lifespan="on",
                            server_header=False)
    server = Server(config)
    # uvicorn re-raises the signal that stopped it once it is done; after a graceful shutdown
    # that would kill us (SIGTERM) or raise KeyboardInterrupt (SIGINT): exit 0 instead.
    saved = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run(sockets=[sock])
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
        sock.close()
    return 0 if server.started else 1


_OPTION_OF = {"max_batch_tokens": "--max-batch-tokens",
              "max_batch_sentences": "--max-batch-sentences", "max_wait_ms": "--max-wait-ms",
              "max_queue": "--max-queue", "max_texts": "--max-texts",
              "max_text_chars": "--max-text-chars", "max_beam": "--max-beam",
              "default_beam": "--beam", "max_body_bytes": "--max-body-bytes",
              "request_timeout_s": "--request-timeout"}


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register ``lass-sparse serve``."""
    p = sub.add_parser(
        "serve", help="HTTP translation server: every direction of one model, batches mixing "
        "directions", description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", metavar="RUN", help="a LaSS run folder (run.json, spm.model)")
    src.add_argument("--hf-model", metavar="DIR",
                     help="a Hugging Face LaSS model folder (lass_config.json, tokenizer)")
    p.add_argument("--stage", default=None, help="--run: the stage whose weights to serve "
                   "(default: joint)")
    p.add_argument("--masks", default=None, help="--run: the MaskBank (a path or a file in the "
                   "run folder); omit to serve the dense model")
    p.add_argument("--pairs", nargs="+", default=None, metavar="PAIR",
                   help="serve only these directions (default: every supervised and zero-shot "
                   "one)")
    p.add_argument("--no-zero-shot", action="store_true",
                   help="do not serve X-Y through merged X-en / en-Y masks")
    p.add_argument("--device", default="auto",
                   help="auto (CUDA when available), cpu, cuda or cuda:N")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="PyTorch CPU threads (default: PyTorch's)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT,
                   help=f"port (default {DEFAULT_PORT}; 0: a free one, printed when ready)")
    g = p.add_argument_group("batching")
    g.add_argument("--batching", choices=MODES, default="cross",
                   help="cross: any directions in one batch; pair: one direction per batch; "
                   "none: one request at a time")
    g.add_argument("--max-wait-ms", type=nonneg_float, default=5.0,
                   help="how long the oldest request waits for others (default 5)")
    g.add_argument("--max-batch-tokens", type=positive_int, default=4096,
                   help="source tokens per batch at most (default 4096)")
    g.add_argument("--max-batch-sentences", type=positive_int, default=64,
                   help="sentences per batch at most (default 64)")
    g.add_argument("--beam", type=positive_int, default=4, help="default beam (default 4)")
    g.add_argument("--lenpen", type=float, default=1.0, help="length penalty (--run)")
    lim = p.add_argument_group("limits")
    lim.add_argument("--max-queue", type=positive_int, default=1024,
                     help="sentences waiting at most; beyond: 503 + Retry-After (default 1024)")
    lim.add_argument("--max-texts", type=positive_int, default=64,
                     help="texts per request at most (default 64)")
    lim.add_argument("--max-text-chars", type=positive_int, default=2000,
                     help="characters per text at most (default 2000)")
    lim.add_argument("--max-beam", type=positive_int, default=8,
                     help="largest beam a request may ask for (default 8)")
    lim.add_argument("--max-body-bytes", type=positive_int, default=1 << 20,
                     help="request body size at most (default 1 MiB)")
    lim.add_argument("--request-timeout", type=nonneg_float, default=30.0,
                     help="seconds a request may take; beyond: 504 (default 30)")
    lim.add_argument("--shutdown-timeout", type=nonneg_float, default=30.0,
                     help="on SIGTERM, seconds to finish the requests already in (default 30)")
    p.add_argument("--log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug"])
    p.add_argument("--access-log", action="store_true", help="log every request")
    p.set_defaults(func=cmd_serve)

