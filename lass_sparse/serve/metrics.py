"""Prometheus text exposition (format 0.0.4) for the server: counters, gauges and histograms
with labels, thread-safe, no dependency. ``/metrics`` returns :meth:`Registry.render`."""

from __future__ import annotations

import bisect
import math
import threading
from collections.abc import Sequence

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    parts = [f'{n}="{_escape(str(v))}"' for n, v in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _num(v: float) -> str:
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v)) if not float(v).is_integer() else str(int(v))


class _Metric:
    kind = ""

    def __init__(self, name: str, help: str, labels: Sequence[str] = ()) -> None:
        self.name, self.help, self.label_names = name, help, tuple(labels)
        self._lock = threading.Lock()

    def _key(self, labels: dict[str, str]) -> tuple[str, ...]:
        if set(labels) != set(self.label_names):
            raise ValueError(f"metric {self.name}: labels must be {list(self.label_names)}, got "
                             f"{sorted(labels)}")
        return tuple(str(labels[n]) for n in self.label_names)

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Metric):
    """A monotonically increasing count (``name`` should end in ``_total``)."""

    kind = "counter"

    def __init__(self, name: str, help: str, labels: Sequence[str] = ()) -> None:
        super().__init__(name, help, labels)
        self._values: dict[tuple[str, ...], float] = {}

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        if amount < 0:
            raise ValueError(f"counter {self.name}: amount must be >= 0, got {amount}")
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: str) -> float:
        with self._lock:
            return self._values.get(self._key(labels), 0.0)

    def render(self) -> list[str]:
        with self._lock:
            items = sorted(self._values.items())
        return self.header() + [f"{self.name}{_labels(self.label_names, k)} {_num(v)}"
                                for k, v in items]


class Gauge(_Metric):
    """A value that goes up and down (no labels)."""

    kind = "gauge"

    def __init__(self, name: str, help: str) -> None:
        super().__init__(name, help)
        self._value = 0.0

    def set(self, value: float) -> None:
        with self._lock:
            self._value = float(value)

    def inc(self, amount: float = 1.0) -> None:
        with self._lock:
            self._value += amount

    def value(self) -> float:
        with self._lock:
            return self._value

    def render(self) -> list[str]:
        return self.header() + [f"{self.name} {_num(self.value())}"]


class Histogram(_Metric):
    """Observations counted into cumulative ``le`` buckets, with ``_sum`` and ``_count``."""

    kind = "histogram"

    def __init__(self, name: str, help: str, buckets: Sequence[float],
                 labels: Sequence[str] = ()) -> None:
        super().__init__(name, help, labels)
        b = sorted(float(x) for x in buckets)
        if not b or b != sorted(set(b)):
            raise ValueError(f"histogram {name}: buckets must be distinct numbers, got {buckets}")
        self.buckets = b
        self._counts: dict[tuple[str, ...], list[int]] = {}
        self._sums: dict[tuple[str, ...], float] = {}

    def observe(self, value: float, **labels: str) -> None:
        key = self._key(labels)
        i = bisect.bisect_left(self.buckets, value)
        with self._lock:
            counts = self._counts.setdefault(key, [0] * (len(self.buckets) + 1))
            counts[i] += 1
            self._sums[key] = self._sums.get(key, 0.0) + value

    def count(self, **labels: str) -> int:
        with self._lock:
            return sum(self._counts.get(self._key(labels), ()))

    def render(self) -> list[str]:
        out = self.header()
        with self._lock:
            items = sorted((k, list(c), self._sums[k]) for k, c in self._counts.items())
        for key, counts, total in items:
            acc = 0
            for le, c in zip([*self.buckets, math.inf], counts):
                acc += c
                le_label = 'le="' + _num(le) + '"'
                out.append(f"{self.name}_bucket{_labels(self.label_names, key, le_label)} {acc}")
            lab = _labels(self.label_names, key)
            out.append(f"{self.name}_sum{lab} {_num(total)}")
            out.append(f"{self.name}_count{lab} {acc}")
        return out


class Registry:
    """The metrics of one server, rendered in registration order."""

    def __init__(self) -> None:
        self._metrics: list[_Metric] = []

    def add(self, metric: _Metric):
        if any(m.name == metric.name for m in self._metrics):
            raise ValueError(f"metric {metric.name} is already registered")
        self._metrics.append(metric)
        return metric

    def render(self) -> str:
        lines: list[str] = []
        for m in self._metrics:
            lines += m.render()
        return "\n".join(lines) + "\n"


LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class ServerMetrics:
    """What the server exports: requests by route and status, sentences and batches by pair,
    queue depth, batch sizes (sentences, pairs, tokens), and latency histograms (request total,
    time queued, batch compute)."""

    def __init__(self) -> None:
        r = self.registry = Registry()
        self.requests = r.add(Counter(
            "lass_serve_requests_total", "HTTP requests by route and status code",
            ("route", "code")))
        self.sentences = r.add(Counter(
            "lass_serve_sentences_total", "Sentences translated, by pair", ("pair",)))
        self.rejected = r.add(Counter(
            "lass_serve_rejected_total", "Translation requests refused or abandoned, by reason",
            ("reason",)))
        self.queue_depth = r.add(Gauge(
            "lass_serve_queue_depth", "Sentences waiting for a batch"))
        self.queue_requests = r.add(Gauge(
            "lass_serve_queue_requests", "Requests waiting for a batch"))
        self.in_flight = r.add(Gauge(
            "lass_serve_in_flight_requests", "Translation requests being handled"))
        self.batches = r.add(Counter(
            "lass_serve_batches_total", "Batches run (one encoder pass + beam search)"))
        self.batch_sentences = r.add(Histogram(
            "lass_serve_batch_sentences", "Sentences per batch", BATCH_BUCKETS))
        self.batch_pairs = r.add(Histogram(
            "lass_serve_batch_pairs", "Distinct pairs per batch", (1, 2, 4, 8, 16, 32)))
        self.batch_tokens = r.add(Histogram(
            "lass_serve_batch_tokens", "Source tokens per batch (padded)",
            (16, 64, 256, 1024, 4096, 16384)))
        self.request_seconds = r.add(Histogram(
            "lass_serve_request_seconds", "Translation request latency (received to answered)",
            LATENCY_BUCKETS))
        self.queue_seconds = r.add(Histogram(
            "lass_serve_queue_seconds", "Time a request waited before its batch started",
            LATENCY_BUCKETS))
        self.batch_seconds = r.add(Histogram(
            "lass_serve_batch_seconds", "Compute time of a batch", LATENCY_BUCKETS))

    def render(self) -> str:
        return self.registry.render()
