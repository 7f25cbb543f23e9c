"""The cross-pair dynamic batcher with a recording fake engine (no model, no HTTP): windows
bounded by time, tokens and sentences; modes cross / pair / none; the bounded queue; cancel;
drain; engine errors; and the Prometheus exposition."""

from __future__ import annotations

import threading
import time

import pytest

from lass_sparse.serve.batcher import Batcher, Draining, Job, Overloaded
from lass_sparse.serve.engine import Engine, Source, directions_served, select_pairs
from lass_sparse.serve.metrics import Counter, Histogram, Registry, ServerMetrics


class FakeEngine(Engine):
    """Records each batch; 'translates' a row to ``pair:ids``; can block or fail."""

    kind = "fake"

    def __init__(self) -> None:
        self._set_pairs(["en-de", "de-en", "en-fr"], [])
        self.max_src_tokens, self.max_output_tokens = 128, 127
        self.batches: list[list[str]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.fail = False
        self.early = False

    def prepare(self, pair, texts, max_len):
        self.check_pair(pair)
        return [Source(pair, [1] * (len(t) + 2), 10, t) for t in texts]

    def run(self, rows, beam, max_len, on_row=None):
        self.batches.append([r.pair for r in rows])
        if on_row is not None and self.early:  # row 0 final before the rest
            on_row(0, f"{rows[0].pair}:{rows[0].text}")
        self.gate.wait(10)
        if self.fail:
            raise RuntimeError("boom")
        return [f"{r.pair}:{r.text}" for r in rows]


def job(eng: Engine, pair: str, texts: list[str], beam: int = 4) -> Job:
    return Job(pair, eng.prepare(pair, texts, None), beam, None, eng.batch_key(beam, None))


def _results(jobs, timeout=10):
    return [j.future.result(timeout) for j in jobs]


@pytest.fixture
def eng():
    return FakeEngine()


def test_cross_mode_batches_pairs_together_within_the_window(eng):
    b = Batcher(eng, mode="cross", max_wait_ms=300)
    jobs = [job(eng, p, [f"s{i}"]) for i, p in enumerate(["en-de", "de-en", "en-fr", "en-de"])]
    for j in jobs:
        b.submit(j)
    b.start()
    res = _results(jobs)
    assert eng.batches == [["en-de", "de-en", "en-fr", "en-de"]]
    assert [r.translations for r in res] == [["en-de:s0"], ["de-en:s1"], ["en-fr:s2"],
                                             ["en-de:s3"]]
    assert all(r.batch_pairs == 3 and r.batch_sentences == 4 and r.batch_requests == 4
               for r in res)
    b.stop()


def test_pair_mode_batches_one_pair_at_a_time_in_arrival_order(eng):
    b = Batcher(eng, mode="pair", max_wait_ms=0)
    jobs = [job(eng, p, ["x"]) for p in ["en-de", "de-en", "en-de", "en-fr", "de-en"]]
    for j in jobs:
        b.submit(j)
    b.start()
    _results(jobs)
    assert eng.batches == [["en-de", "en-de"], ["de-en", "de-en"], ["en-fr"]]
    b.stop()


def test_none_mode_runs_one_request_at_a_time(eng):
    b = Batcher(eng, mode="none", max_wait_ms=1000)
    jobs = [job(eng, "en-de", ["a", "b"]), job(eng, "en-de", ["c"])]
    for j in jobs:
        b.submit(j)
    t0 = time.monotonic()
    b.start()
    _results(jobs)
    assert time.monotonic() - t0 < 0.9  # no window in this mode
    assert eng.batches == [["en-de", "en-de"], ["en-de"]]  # a request is never split
    b.stop()


def test_different_beams_never_share_a_batch(eng):
    b = Batcher(eng, max_wait_ms=0)
    jobs = [job(eng, "en-de", ["a"], beam=4), job(eng, "de-en", ["b"], beam=1),
            job(eng, "en-fr", ["c"], beam=4)]
    for j in jobs:
        b.submit(j)
    b.start()
    _results(jobs)
    assert eng.batches == [["en-de", "en-fr"], ["de-en"]]
    b.stop()


def test_window_closes_early_when_the_token_or_sentence_bound_is_reached(eng):
    b = Batcher(eng, max_wait_ms=10_000, max_batch_sentences=3)
    jobs = [job(eng, "en-de", ["a"]) for _ in range(4)]
    for j in jobs:
        b.submit(j)
    t0 = time.monotonic()
    b.start()
    _results(jobs[:3])
    assert time.monotonic() - t0 < 5  # did not wait the 10 s window
    assert eng.batches[0] == ["en-de"] * 3
    b.begin_drain()
    _results(jobs[3:])
    b.stop()
    eng.batches.clear()
    b = Batcher(eng, max_wait_ms=10_000, max_batch_tokens=10)  # each text: 3 + 2 = 5 tokens
    jobs = [job(eng, "en-de", ["abc"]) for _ in range(3)]
    for j in jobs:
        b.submit(j)
    b.start()
    _results(jobs[:2])
    assert eng.batches[0] == ["en-de"] * 2
    b.stop()
    _results(jobs)


def test_the_window_waits_for_more_requests(eng):
    b = Batcher(eng, max_wait_ms=400)
    b.start()
    first = b.submit(job(eng, "en-de", ["a"]))
    time.sleep(0.1)
    second = b.submit(job(eng, "de-en", ["b"]))
    assert first.result(10).batch_requests == 2 and second.result(10).batch_pairs == 2
    assert eng.batches == [["en-de", "de-en"]]
    b.stop()


def test_bounded_queue_raises_overloaded_with_retry_after(eng):
    m = ServerMetrics()
    b = Batcher(eng, max_queue=3, max_wait_ms=0, metrics=m)
    b.submit(job(eng, "en-de", ["a", "b"]))
    with pytest.raises(Overloaded, match="limit 3") as e:
        b.submit(job(eng, "en-de", ["c", "d"]))
    assert e.value.retry_after >= 1
    assert b.queued_sentences == 2 and m.queue_depth.value() == 2
    b.submit(job(eng, "en-de", ["c"]))  # fits exactly
    b.start()
    b.stop()
    assert b.queued_sentences == 0 and m.queue_depth.value() == 0


def test_a_request_is_answered_when_its_rows_are_final_not_when_the_batch_ends(eng):
    eng.early = True
    eng.gate.clear()
    b = Batcher(eng, max_wait_ms=0)
    first, second = job(eng, "en-de", ["a"]), job(eng, "de-en", ["b"])
    b.submit(first)
    b.submit(second)
    b.start()
    assert first.future.result(10).translations == ["en-de:a"]  # while the batch still runs
    assert not second.future.done()
    eng.gate.set()
    assert second.future.result(10).translations == ["de-en:b"]
    assert eng.batches == [["en-de", "de-en"]]
    b.stop()


def test_cancel_drops_a_queued_request_and_it_never_runs(eng):
    eng.gate.clear()
    b = Batcher(eng, max_wait_ms=0)
    b.start()
    running = job(eng, "en-de", ["a"])
    b.submit(running)
    deadline = time.monotonic() + 5
    while b.queued_sentences and time.monotonic() < deadline:  # the worker took it
        time.sleep(0.01)
    waiting = job(eng, "de-en", ["b"])
    b.submit(waiting)
    assert b.cancel(waiting) and not b.cancel(waiting)
    assert not b.cancel(running)  # already running: cannot be dropped
    eng.gate.set()
    assert running.future.result(10).translations == ["en-de:a"]
    assert waiting.future.cancelled()
    b.stop()
    assert eng.batches == [["en-de"]]


def test_a_request_whose_future_was_cancelled_is_skipped(eng):
    b = Batcher(eng, max_wait_ms=0)
    a, c = job(eng, "en-de", ["a"]), job(eng, "de-en", ["c"])
    b.submit(a)
    b.submit(c)
    a.future.cancel()  # what asyncio does to a timed-out wrapped future
    b.start()
    assert c.future.result(10).translations == ["de-en:c"]
    b.stop()
    assert eng.batches == [["de-en"]]


def test_drain_flushes_the_window_and_refuses_new_work(eng):
    b = Batcher(eng, max_wait_ms=60_000)
    b.start()
    futs = [b.submit(job(eng, p, ["x"])) for p in ("en-de", "de-en")]
    time.sleep(0.05)
    assert not futs[0].done()
    t0 = time.monotonic()
    b.begin_drain()
    assert [f.result(10).batch_requests for f in futs] == [2, 2]
    assert time.monotonic() - t0 < 5
    with pytest.raises(Draining):
        b.submit(job(eng, "en-de", ["y"]))
    assert b.stop(10)


def test_engine_errors_reach_every_request_of_the_batch_and_the_worker_survives(eng):
    eng.fail = True
    b = Batcher(eng, max_wait_ms=50)
    b.start()
    futs = [b.submit(job(eng, p, ["x"])) for p in ("en-de", "de-en")]
    for f in futs:
        with pytest.raises(RuntimeError, match="boom"):
            f.result(10)
    eng.fail = False
    assert b.submit(job(eng, "en-fr", ["z"])).result(10).translations == ["en-fr:z"]
    b.stop()


def test_batcher_arguments_are_checked(eng):
    with pytest.raises(ValueError, match="mode"):
        Batcher(eng, mode="sometimes")
    with pytest.raises(ValueError, match="max_queue"):
        Batcher(eng, max_queue=0)
    with pytest.raises(ValueError, match="max_wait_ms"):
        Batcher(eng, max_wait_ms=-1)


def test_directions_served_and_selection():
    sup, zs = directions_served(["en-de", "de-en", "en-fr", "fr-en", "en-zh"])
    assert zs == ["de-fr", "de-zh", "fr-de", "fr-zh"]  # zh-X would need zh-en
    assert directions_served(["en-de", "de-en"], zero_shot=False) == (["en-de", "de-en"], [])
    assert select_pairs(sup, zs, ["fr-de", "en-de"]) == (["en-de"], ["fr-de"])
    with pytest.raises(ValueError, match="xx-yy"):
        select_pairs(sup, zs, ["xx-yy"])


def test_prometheus_exposition():
    r = Registry()
    c = r.add(Counter("x_total", "things", ("kind",)))
    h = r.add(Histogram("lat_seconds", "latency", (0.1, 1.0)))
    c.inc(kind='a"b\\')
    c.inc(2, kind="c")
    for v in (0.05, 0.5, 5.0):
        h.observe(v)
    text = r.render()
    assert '# TYPE x_total counter\nx_total{kind="a\\"b\\\\"} 1\nx_total{kind="c"} 2\n' in text
    assert 'lat_seconds_bucket{le="0.1"} 1\nlat_seconds_bucket{le="1"} 2\n' in text
    assert 'lat_seconds_bucket{le="+Inf"} 3\nlat_seconds_sum 5.55\nlat_seconds_count 3\n' in text
    with pytest.raises(ValueError, match="labels"):
        c.inc(other="x")
    with pytest.raises(ValueError, match="already registered"):
        r.add(Counter("x_total", "again"))
