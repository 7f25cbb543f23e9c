"""Dynamic batching across pairs: a bounded queue and one worker thread that runs the model.

Requests wait in a FIFO queue. The worker takes the oldest request and, within a window bounded
by time (``max_wait_ms`` since that request arrived) and size (``max_batch_tokens`` source
tokens, ``max_batch_sentences`` sentences), gathers every queued request it may share a batch
with, then runs them as one batch. Modes:

- ``cross``: any pairs together (one forward per decoder step, each row under its own mask);
- ``pair``: only requests for the same pair (the baseline of one model per direction);
- ``none``: one request at a time, no batching.

Requests share a batch only when their :meth:`Engine.batch_key` (the beam width) is equal.
The queue is bounded in sentences: :class:`Overloaded` carries a ``Retry-After`` estimate from
the recent throughput. :meth:`Batcher.begin_drain` stops admissions and flushes the window;
:meth:`Batcher.stop` returns when every admitted request has been answered.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import math
import threading
import time
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

from .engine import Engine, Source
from .metrics import ServerMetrics

MODES = ("cross", "pair", "none")
log = logging.getLogger("lass_sparse.serve")


class Overloaded(RuntimeError):
    """The queue is full; ``retry_after`` (seconds) is when it should have room."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Draining(RuntimeError):
    """The server is shutting down and admits no new work."""


@dataclass
class JobResult:
    """A request's translations and where its time went."""

    translations: list[str]
    queue_s: float
    compute_s: float
    batch_sentences: int
    batch_requests: int
    batch_pairs: int


@dataclass(eq=False)
class Job:
    """One request in the queue: its rows share a batch (a request is never split)."""

    pair: str
    rows: list[Source]
    beam: int
    max_len: int | None
    key: Hashable
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    enqueued: float = field(default_factory=time.monotonic)
    started: float | None = None

    @property
    def sentences(self) -> int:
        return len(self.rows)

    @property
    def tokens(self) -> int:
        return sum(len(r.ids) for r in self.rows)


class Batcher:
    """The queue and the worker thread. ``submit`` is called from the event loop; the model runs
    on the worker (PyTorch releases the GIL, so the server keeps answering meanwhile)."""

    def __init__(self, engine: Engine, *, mode: str = "cross", max_batch_tokens: int = 4096,
                 max_batch_sentences: int = 64, max_wait_ms: float = 5.0,
                 max_queue: int = 1024, metrics: ServerMetrics | None = None) -> None:
        if mode not in MODES:
            raise ValueError(f"batching mode must be one of {', '.join(MODES)}, got {mode!r}")
        for name, v in (("max_batch_tokens", max_batch_tokens),
                        ("max_batch_sentences", max_batch_sentences), ("max_queue", max_queue)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if not max_wait_ms >= 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms!r}")
        self.engine, self.mode = engine, mode
        self.max_batch_tokens, self.max_batch_sentences = max_batch_tokens, max_batch_sentences
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.metrics = metrics or ServerMetrics()
        self._queue: collections.deque[Job] = collections.deque()
        self._queued_sentences = 0
        self._cond = threading.Condition()
        self._draining = False
        self._stopping = False
        self._rate = 0.0  # sentences/s of recent batches (EWMA)
        self._thread: threading.Thread | None = None

    # ---------------------------------------------------------------- the event-loop side

    @property
    def queued_sentences(self) -> int:
        return self._queued_sentences

    @property
    def draining(self) -> bool:
        return self._draining

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="lass-serve-batcher",
                                            daemon=True)
            self._thread.start()

    def submit(self, job: Job) -> concurrent.futures.Future:
        """Queue ``job``; raises :class:`Draining` or :class:`Overloaded` instead of queueing
        beyond ``max_queue`` sentences."""
        with self._cond:
            if self._draining:
                raise Draining("the server is shutting down")
            if self._queued_sentences + job.sentences > self.max_queue:
                raise Overloaded(
                    f"the queue is full ({self._queued_sentences} sentences waiting, limit "
                    f"{self.max_queue}); retry later", self._retry_after())
            self._queue.append(job)
            self._queued_sentences += job.sentences
            self._gauges()
            self._cond.notify()
        return job.future

    def cancel(self, job: Job) -> bool:
        """Drop ``job`` if it has not started (a timed-out request); True if it was dropped."""
        with self._cond:
            try:
                self._queue.remove(job)
            except ValueError:
                return False
            self._queued_sentences -= job.sentences
            self._gauges()
        job.future.cancel()
        return True

    def begin_drain(self) -> None:
        """Admit nothing more and run what is queued without waiting for the window."""
        with self._cond:
            self._draining = True
            self._cond.notify_all()

    def stop(self, timeout: float | None = None) -> bool:
        """Drain and stop the worker; True if every admitted request was answered in time."""
        with self._cond:
            self._draining = self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            return not self._thread.is_alive()
        return True

    def _retry_after(self) -> int:
        if self._rate <= 0:
            return 1
        return int(min(60, max(1, math.ceil(self._queued_sentences / self._rate))))

    def _gauges(self) -> None:
        self.metrics.queue_depth.set(self._queued_sentences)
        self.metrics.queue_requests.set(len(self._queue))

    # ---------------------------------------------------------------- the worker side

    def _compatible(self, head: Job, job: Job) -> bool:
        if job.key != head.key:
            return False
        return self.mode != "pair" or job.pair == head.pair

    def _full(self, head: Job) -> bool:
        n = tokens = 0
        for j in self._queue:
            if self._compatible(head, j):
                n += j.sentences
                tokens += j.tokens
                if n >= self.max_batch_sentences or tokens >= self.max_batch_tokens:
                    return True
        return False

    def _next_batch(self) -> list[Job] | None:
        with self._cond:
            while True:
                if not self._queue:
                    if self._stopping:
                        return None
                    self._cond.wait()
                    continue
                head = self._queue[0]
                if self.mode == "none" or self._draining or self._full(head):
                    break
                wait = head.enqueued + self.max_wait - time.monotonic()
                if wait <= 0:
                    break
                self._cond.wait(wait)
            batch, n, tokens = [head], head.sentences, head.tokens
            if self.mode != "none":
                for j in list(self._queue)[1:]:
                    if (self._compatible(head, j) and n + j.sentences <= self.max_batch_sentences
                            and tokens + j.tokens <= self.max_batch_tokens):
                        batch.append(j)
                        n += j.sentences
                        tokens += j.tokens
            taken = set(map(id, batch))
            self._queue = collections.deque(j for j in self._queue if id(j) not in taken)
            self._queued_sentences -= n
            self._gauges()
        now = time.monotonic()
        live = []
        for j in batch:  # a request whose caller gave up is not run
            if j.future.set_running_or_notify_cancel():
                j.started = now
                live.append(j)
        return live

    def _work(self) -> None:
        while True:
            try:
                batch = self._next_batch()
            except Exception:  # pragma: no cover - a bug; keep serving
                log.exception("batcher: forming a batch failed")
                continue
            if batch is None:
                return
            if batch:
                self._run(batch)

    def _run(self, batch: Sequence[Job]) -> None:
        m = self.metrics
        rows = [r for j in batch for r in j.rows]
        pairs = {r.pair for r in rows}
        owner = [j for j in batch for _ in range(j.sentences)]  # row -> its request
        starts, n = {}, 0
        for j in batch:
            starts[id(j)] = n
            n += j.sentences
        outs: list[str | None] = [None] * len(rows)
        left = {id(j): j.sentences for j in batch}
        t0 = time.monotonic()

        def finish(j: Job) -> None:
            compute = time.monotonic() - t0
            start = starts[id(j)]
            res = JobResult([str(x) for x in outs[start:start + j.sentences]],
                            (j.started or t0) - j.enqueued, compute, len(rows), len(batch),
                            len(pairs))
            m.sentences.inc(j.sentences, pair=j.pair)
            m.queue_seconds.observe(res.queue_s)
            j.future.set_result(res)

        def on_row(i: int, text: str) -> None:  # a row is final: answer its request if done
            if outs[i] is None:
                outs[i] = text
                j = owner[i]
                left[id(j)] -= 1
                if left[id(j)] == 0:
                    finish(j)

        try:
            final = self.engine.run(rows, batch[0].beam, batch[0].max_len, on_row)
            if len(final) != len(rows):
                raise RuntimeError(f"engine returned {len(final)} translations for "
                                   f"{len(rows)} sentences")
            for i, text in enumerate(final):
                if outs[i] is not None and outs[i] != text:
                    raise RuntimeError(f"engine: row {i} changed after it was final")
                on_row(i, text)
        except Exception as e:
            log.exception("batch of %d sentences failed", len(rows))
            for j in batch:
                if not j.future.done():
                    j.future.set_exception(e)
            return
        compute = time.monotonic() - t0
        rate = len(rows) / max(compute, 1e-6)
        self._rate = rate if self._rate == 0 else 0.8 * self._rate + 0.2 * rate
        m.batches.inc()
        m.batch_sentences.observe(len(rows))
        m.batch_pairs.observe(len(pairs))
        m.batch_tokens.observe(len(rows) * max(len(r.ids) for r in rows))
        m.batch_seconds.observe(compute)
