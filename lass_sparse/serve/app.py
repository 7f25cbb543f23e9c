"""The HTTP API (FastAPI): ``POST /v1/translate``, ``GET /v1/pairs``, ``/health``, ``/metrics``,
the OpenAPI schema (``/openapi.json``, ``/docs``) and a page to try it at ``/``.

Bodies are parsed as JSON only and validated (pydantic); every error is JSON
``{"detail": ...}`` with a status that says whose fault it is: 404 unknown pair (naming the
served ones), 413 a text, a request or a body over its limit (naming the limit), 422 a malformed
or invalid body, 503 a full queue (with ``Retry-After``) or a draining server, 504 a request that
ran past ``request_timeout_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import asdict, dataclass
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .batcher import Batcher, Draining, Job, JobResult, Overloaded
from .engine import Engine, TooLong, UnknownPair
from .metrics import CONTENT_TYPE, ServerMetrics


@dataclass
class ServeConfig:
    """Limits and batching of one server; the defaults are safe for a public-facing CPU box.

    ``max_text_chars`` / ``max_texts`` / ``max_beam`` bound a request (413 / 422 beyond);
    ``max_body_bytes`` bounds the raw body (413); ``max_queue`` bounds the sentences waiting
    (503 beyond); ``request_timeout_s`` bounds a request's time in the server (504)."""

    mode: str = "cross"
    max_batch_tokens: int = 4096
    max_batch_sentences: int = 64
    max_wait_ms: float = 5.0
    max_queue: int = 1024
    max_texts: int = 64
    max_text_chars: int = 2000
    max_beam: int = 8
    default_beam: int = 4
    max_body_bytes: int = 1 << 20
    request_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        ints = ("max_batch_tokens", "max_batch_sentences", "max_queue", "max_texts",
                "max_text_chars", "max_beam", "default_beam", "max_body_bytes")
        for name in ints:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if not self.default_beam <= self.max_beam:
            raise ValueError(f"default_beam ({self.default_beam}) must be <= max_beam "
                             f"({self.max_beam})")
        if self.max_texts > self.max_queue:
            raise ValueError(f"max_texts ({self.max_texts}) must be <= max_queue "
                             f"({self.max_queue}): a request larger than the queue never fits")
        if not self.request_timeout_s > 0:
            raise ValueError(f"request_timeout_s must be > 0, got {self.request_timeout_s!r}")
        if not self.max_wait_ms >= 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {self.max_wait_ms!r}")


class TranslateRequest(BaseModel):
    """``text``: one string or a list (translated together, answered in order)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    pair: str = Field(description="direction, e.g. 'en-de' (see GET /v1/pairs)",
                      examples=["en-de"])
    text: str | list[str] = Field(description="a sentence, or a list of sentences",
                                  examples=["Open the file"])
    beam: int | None = Field(None, description="beam width (default: the server's)")
    max_len: int | None = Field(None, description="decoding steps at most (default: as the "
                                "offline translate, from the source length)")


class Timings(BaseModel):
    queue_ms: float = Field(description="waiting for a batch")
    compute_ms: float = Field(description="model time from the batch's start until this "
                              "request's sentences were final (it is answered then, not when "
                              "the whole batch ends)")
    total_ms: float = Field(description="received to answered")
    batch_sentences: int = Field(description="sentences in the batch this request ran in")
    batch_requests: int = Field(description="requests in that batch")
    batch_pairs: int = Field(description="distinct pairs in that batch")


class TranslateResponse(BaseModel):
    pair: str
    beam: int
    translations: list[str]
    translation: str | None = Field(None, description="the translation when text was a string")
    timings: Timings


class PairsResponse(BaseModel):
    pairs: list[str] = Field(description="every direction served")
    supervised: list[str] = Field(description="directions with their own mask")
    zero_shot: list[str] = Field(description="X-Y served through the merged X-en encoder and "
                                 "en-Y decoder masks")
    pivot: str = "en"


class ErrorResponse(BaseModel):
    detail: Any


_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text} for code, text in (
        (404, "unknown pair (the message lists the served ones)"),
        (413, "a text, the list or the body is over its limit (named in the message)"),
        (422, "malformed JSON or an invalid field"),
        (503, "queue full (Retry-After header) or shutting down"),
        (504, "the request ran past the server's timeout"),
    )
}


def _error(code: int, detail: Any, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=code, headers=headers)


def _errors(errors: Any) -> list[dict[str, Any]]:
    """Validation errors as JSON: where, what, which kind (not the input, which may be huge)."""
    return [{"loc": [str(x) for x in e.get("loc", ())], "msg": str(e.get("msg", "")),
             "type": str(e.get("type", ""))} for e in errors]


def _page() -> str:
    return resources.files("lass_sparse.serve").joinpath("page.html").read_text("utf-8")


class _Guard:
    """ASGI middleware: bounds a request body (413 naming the limit, before any parsing; the
    body is read once and replayed to the app) and counts responses by route template and
    status (unknown paths share one label, so random URLs cannot grow the metrics)."""

    def __init__(self, app: Any, max_body_bytes: int, metrics: ServerMetrics) -> None:
        self.app, self.max_body, self.metrics = app, max_body_bytes, metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = [500]

        async def send_counted(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            if scope["method"] in ("POST", "PUT", "PATCH"):
                too_big = _error(413, f"request body over the limit of {self.max_body} bytes")
                length = dict(scope["headers"]).get(b"content-length")
                if length is not None and (not length.isdigit() or int(length) > self.max_body):
                    await too_big(scope, receive, send_counted)
                    return
                body = bytearray()
                more = True
                while more:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return
                    body += message.get("body", b"")
                    more = message.get("more_body", False)
                    if len(body) > self.max_body:
                        await too_big(scope, receive, send_counted)
                        return
                receive = _replay(bytes(body), receive)
            await self.app(scope, receive, send_counted)
        finally:
            route = getattr(scope.get("route"), "path", None) or "other"
            self.metrics.requests.inc(route=route, code=str(status[0]))


def _replay(body: bytes, receive: Any) -> Any:
    sent = False

    async def replayed() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # then: the disconnect, when it comes

    return replayed


def create_app(engine: Engine, config: ServeConfig | None = None,
               metrics: ServerMetrics | None = None) -> FastAPI:
    """The ASGI app serving ``engine``; the batcher thread runs for the app's lifespan."""
    cfg = config or ServeConfig()
    m = metrics or ServerMetrics()
    batcher = Batcher(engine, mode=cfg.mode, max_batch_tokens=cfg.max_batch_tokens,
                      max_batch_sentences=cfg.max_batch_sentences, max_wait_ms=cfg.max_wait_ms,
                      max_queue=cfg.max_queue, metrics=m)
    started = time.time()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        yield
        await asyncio.to_thread(batcher.stop)  # every admitted request answered first

    app = FastAPI(title="lass-sparse serve", version="1",
                  summary="Many translation directions from one model: LaSS masks, one forward "
                  "per decoder step for a batch that mixes directions.",
                  lifespan=lifespan)
    app.state.engine, app.state.batcher, app.state.metrics = engine, batcher, m
    app.state.config = cfg
    page = _page()

    app.add_middleware(_Guard, max_body_bytes=cfg.max_body_bytes, metrics=m)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(422, _errors(exc.errors()))

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> JSONResponse:
        return _error(500, f"internal error: {type(exc).__name__}: {exc}")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/health", summary="liveness and readiness (503 while shutting down)")
    async def health() -> JSONResponse:
        body = {"status": "draining" if batcher.draining else "ok",
                **engine.info(), "pairs": len(engine.pairs), "batching": cfg.mode,
                "queue_sentences": batcher.queued_sentences,
                "uptime_s": round(time.time() - started, 3)}
        return JSONResponse(body, status_code=503 if batcher.draining else 200)

    @app.get("/metrics", summary="Prometheus metrics (text format 0.0.4)",
             response_class=PlainTextResponse)
    async def metrics_text() -> PlainTextResponse:
        return PlainTextResponse(m.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/pairs", response_model=PairsResponse, summary="directions served")
    async def pairs() -> PairsResponse:
        return PairsResponse(pairs=engine.pairs, supervised=engine.supervised,
                             zero_shot=engine.zero_shot)

    @app.get("/v1/config", summary="the server's limits and batching")
    async def config_view() -> dict[str, Any]:
        return asdict(cfg)

    body_schema = TranslateRequest.model_json_schema()

    @app.post("/v1/translate", response_model=TranslateResponse, responses=_ERRORS,
              summary="translate one sentence or a list along one direction",
              openapi_extra={"requestBody": {
                  "required": True, "content": {"application/json": {"schema": body_schema}}}})
    async def translate(request: Request) -> Any:
        # the body (read once, size-bounded by _Guard) is parsed as JSON whatever the
        # Content-Type says, by pydantic's strict parser: JSON only, no nesting limit to hit
        try:
            req = TranslateRequest.model_validate_json(await request.body())
        except ValidationError as e:
            return _error(422, _errors(e.errors()))
        t0 = time.monotonic()
        texts = [req.text] if isinstance(req.text, str) else list(req.text)
        beam = cfg.default_beam if req.beam is None else req.beam
        if not 1 <= beam <= cfg.max_beam:
            return _error(422, f"beam must be in [1, {cfg.max_beam}], got {beam}")
        if req.max_len is not None and not 1 <= req.max_len <= engine.max_output_tokens:
            return _error(422, f"max_len must be in [1, {engine.max_output_tokens}], got "
                          f"{req.max_len}")
        if not texts:
            return _error(422, "text must be a string or a non-empty list of strings")
        if len(texts) > cfg.max_texts:
            return _error(413, f"{len(texts)} texts in one request; the limit is "
                          f"{cfg.max_texts}")
        for i, t in enumerate(texts):
            if len(t) > cfg.max_text_chars:
                return _error(413, f"text[{i}] is {len(t)} characters; the limit is "
                              f"{cfg.max_text_chars}")
        try:
            engine.check_pair(req.pair)
            rows = engine.prepare(req.pair, texts, req.max_len)
        except UnknownPair as e:
            return _error(404, str(e))
        except TooLong as e:
            return _error(413, str(e))
        job = Job(req.pair, rows, beam, req.max_len, engine.batch_key(beam, req.max_len))
        try:
            fut = batcher.submit(job)
        except Overloaded as e:
            m.rejected.inc(reason="queue_full")
            return _error(503, str(e), {"Retry-After": str(e.retry_after)})
        except Draining as e:
            m.rejected.inc(reason="draining")
            return _error(503, str(e), {"Retry-After": "1"})
        m.in_flight.inc()
        try:
            left = cfg.request_timeout_s - (time.monotonic() - t0)
            res: JobResult = await asyncio.wait_for(asyncio.wrap_future(fut), max(left, 0.0))
        except asyncio.TimeoutError:
            batcher.cancel(job)
            m.rejected.inc(reason="timeout")
            return _error(504, f"the request took longer than the server's timeout of "
                          f"{cfg.request_timeout_s:g} s")
        finally:
            m.in_flight.inc(-1)
        total = time.monotonic() - t0
        m.request_seconds.observe(total)
        return TranslateResponse(
            pair=req.pair, beam=beam, translations=res.translations,
            translation=res.translations[0] if isinstance(req.text, str) else None,
            timings=Timings(queue_ms=round(res.queue_s * 1e3, 3),
                            compute_ms=round(res.compute_s * 1e3, 3),
                            total_ms=round(total * 1e3, 3), batch_sentences=res.batch_sentences,
                            batch_requests=res.batch_requests, batch_pairs=res.batch_pairs))

    return app


def openapi_json(app: FastAPI) -> str:
    """The app's OpenAPI schema as JSON text."""
    return json.dumps(app.openapi(), indent=1)
