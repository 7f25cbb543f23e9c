"""``lass-sparse serve`` over HTTP: real server processes on 127.0.0.1 (random free ports)
serving the published models in results/models (6 supervised + 6 zero-shot directions).

Checks: outputs equal offline ``translate`` token for token (batches that mix pairs, zero-shot
included), every error path (404/413/422/503/504), metrics, OpenAPI, a JSON fuzz that never
gets a 500 nor grows the server, graceful shutdown that answers queued requests, the page in a
headless browser, and the CLI's one-line errors.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
pytest.importorskip("sentencepiece")

from lass_sparse.serve.process import ServerProcess, wait_all  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RUN = os.path.join(REPO, "results", "models")
BASE = ["--run", RUN, "--stage", "lass", "--masks", "masks.safetensors", "--log-level",
        "warning"]
# the directions the requests below use (sentences for de, fr, zh); the published model serves
# every direction of its pairs (PUBLISHED_*), checked against /v1/pairs
SUPERVISED = ["en-de", "de-en", "en-fr", "fr-en", "en-zh", "zh-en"]
ZERO_SHOT = ["de-fr", "de-zh", "fr-de", "fr-zh", "zh-de", "zh-fr"]


def _published() -> tuple[list[str], list[str]]:
    from lass_sparse.mt.direction import english_centric_directions, zero_shot_directions

    path = os.path.join(RUN, "run.json")
    if not os.path.exists(path):
        return [], []
    with open(path) as f:
        langs = [p.split("-")[1] for p in json.load(f)["pairs"]]
    return english_centric_directions(langs), zero_shot_directions(langs)


PUBLISHED_SUPERVISED, PUBLISHED_ZERO_SHOT = _published()
N_PUBLISHED = len(PUBLISHED_SUPERVISED) + len(PUBLISHED_ZERO_SHOT)
LIMITS = dict(max_texts=8, max_text_chars=1200, max_body_bytes=20000, max_beam=6)

pytestmark = pytest.mark.skipif(not os.path.exists(os.path.join(RUN, "run.json")),
                                reason="results/models (the published models) not present")


def _limit_args() -> list[str]:
    return [f"--{k.replace('_', '-')}={v}" for k, v in LIMITS.items()]


@pytest.fixture(scope="module")
def servers():
    """The main server (cross-pair batching, a 40 ms window) and a tight one (queue of 4
    sentences, a 10 s window, 3 s timeout) for the overload paths; started together."""
    main = ServerProcess(BASE + _limit_args() + ["--max-wait-ms", "40"], cwd=REPO)
    tight = ServerProcess(BASE + ["--max-queue", "4", "--max-texts", "4", "--max-wait-ms",
                                  "10000", "--request-timeout", "3"], cwd=REPO)
    try:
        wait_all([main, tight])
        yield {"main": main, "tight": tight}
    finally:
        for s in (main, tight):
            if s.proc is not None and s.proc.poll() is None:
                s.proc.send_signal(signal.SIGTERM)  # both at once, then wait
        for s in (main, tight):
            s.stop()


@pytest.fixture(scope="module")
def url(servers):
    return servers["main"].url


@pytest.fixture(scope="module")
def client(url):
    with httpx.Client(base_url=url, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def offline():
    """The same model in this process, as the CLI's offline translate runs it
    (``pipeline.translate_texts``: the pair's mask, zero-shot through the merged masks):
    ``offline(pair, texts, beam)``."""
    from lass_sparse.lass.pipeline import load_bank, open_run
    from lass_sparse.lass.translate import ensure_pair, translate
    from lass_sparse.nn import active_pair, attach

    run = open_run(RUN, "cpu")
    model = run.load_model("lass")
    bank = load_bank(run, "masks.safetensors")
    attach(model, bank)

    def go(pair: str, texts: list[str], beam: int) -> list[str]:
        ensure_pair(bank, pair)
        with active_pair(model, pair):
            return translate(model, run.tok, texts, pair, beam=beam, langtok=run.langtok)

    return go


SENTENCES = {
    "en": ["Open the file", "The window cannot be closed.", "Save changes before closing?",
           "Print the selected pages", "No network connection", "Delete this folder?"],
    "de": ["Datei öffnen", "Das Fenster kann nicht geschlossen werden.", "Änderungen speichern?",
           "Keine Verbindung zum Netzwerk"],
    "fr": ["Ouvrir le fichier", "La fenêtre ne peut pas être fermée.", "Enregistrer ?",
           "Aucune connexion réseau"],
    "zh": ["打开文件", "无法关闭窗口。", "保存更改？", "没有网络连接"],
}


def _post(client, body, **kw):
    return client.post("/v1/translate", json=body, **kw)


def _metric(text: str, name: str, labels: str = "") -> float:
    m = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


# ------------------------------------------------------------------------------ the API


def test_pairs_health_openapi_and_page(client):
    r = client.get("/v1/pairs")
    assert r.status_code == 200
    body = r.json()
    assert body["supervised"] == PUBLISHED_SUPERVISED
    assert body["zero_shot"] == PUBLISHED_ZERO_SHOT
    assert set(SUPERVISED) <= set(PUBLISHED_SUPERVISED) and set(ZERO_SHOT) <= set(
        PUBLISHED_ZERO_SHOT)
    assert body["pairs"] == PUBLISHED_SUPERVISED + PUBLISHED_ZERO_SHOT and body["pivot"] == "en"
    h = client.get("/health")
    assert h.status_code == 200 and h.json()["status"] == "ok"
    assert h.json()["pairs"] == N_PUBLISHED
    assert h.json()["mask_bytes"] > 0 and h.json()["batching"] == "cross"
    spec = client.get("/openapi.json").json()
    post = spec["paths"]["/v1/translate"]["post"]
    schema = post["requestBody"]["content"]["application/json"]["schema"]
    assert set(schema["properties"]) == {"pair", "text", "beam", "max_len"}
    assert {"200", "404", "413", "422", "503", "504"} <= set(post["responses"])
    assert {"/v1/pairs", "/health", "/metrics"} <= set(spec["paths"])
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert '<select id="pair"' in page.text and "<textarea" in page.text
    cfg = client.get("/v1/config").json()
    assert cfg["max_texts"] == LIMITS["max_texts"] and cfg["mode"] == "cross"


def test_responses_do_not_wait_for_delayed_acks(client):
    """The listening socket is TCP (proto 6), so asyncio sets TCP_NODELAY on connections:
    without it every response waited ~40 ms for the client's delayed ACK."""
    from lass_sparse.serve.commands import _bind

    with _bind("127.0.0.1", 0) as s:
        assert s.proto == socket.IPPROTO_TCP
    times = []
    for _ in range(15):
        t0 = time.perf_counter()
        assert client.get("/health").status_code == 200
        times.append(time.perf_counter() - t0)
    assert sorted(times)[len(times) // 2] < 0.035, times


def test_single_string_and_list(client, offline):
    r = _post(client, {"pair": "en-de", "text": "Open the file", "beam": 2})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["translation"] == body["translations"][0] == offline("en-de", ["Open the file"],
                                                                     2)[0]
    assert body["pair"] == "en-de" and body["beam"] == 2
    t = body["timings"]
    assert t["total_ms"] >= t["compute_ms"] > 0 and t["batch_sentences"] >= 1
    r = _post(client, {"pair": "de-en", "text": SENTENCES["de"][:3]})
    assert r.status_code == 200 and r.json()["translation"] is None
    assert r.json()["translations"] == offline("de-en", SENTENCES["de"][:3], 4)


def test_outputs_equal_offline_translate_in_mixed_batches(client, offline):
    """Concurrent requests over all 12 directions (zero-shot included), beams 1 and 4: batches
    mix pairs, and every translation equals offline translate of that request, token for
    token."""
    reqs = []
    for i, pair in enumerate(SUPERVISED + ZERO_SHOT):
        src = SENTENCES[pair.split("-")[0]]
        for beam in (1, 4):
            for j in range(2):
                reqs.append({"pair": pair, "text": src[(i + j) % len(src):][:1 + j],
                             "beam": beam})
    barrier = threading.Barrier(16)

    def send(body):
        try:
            barrier.wait(timeout=5)
        except threading.BrokenBarrierError:
            pass
        return _post(client, body)

    with ThreadPoolExecutor(16) as ex:
        responses = list(ex.map(send, reqs))
    mixed = 0
    for body, r in zip(reqs, responses):
        assert r.status_code == 200, r.text
        got = r.json()
        want = offline(body["pair"], body["text"], body["beam"])
        assert got["translations"] == want, (body, got["translations"], want)
        mixed += got["timings"]["batch_pairs"] > 1
    assert mixed > 0, "no batch mixed pairs: the cross-pair path was not exercised"


def test_max_len_caps_the_output(client):
    r = _post(client, {"pair": "en-fr", "text": SENTENCES["en"][1], "max_len": 2, "beam": 1})
    assert r.status_code == 200, r.text
    out = r.json()["translation"]
    # at most 2 decoding steps, the last one EOS: one piece at most
    from lass_sparse.lass.tokenizer import Tokenizer

    tok = Tokenizer(os.path.join(RUN, "spm.model"))
    assert len(tok.encode([out])[0]) <= 2


# ------------------------------------------------------------------------------ error paths


def test_unknown_pair_is_404_naming_the_known_ones(client):
    for pair in ("xx-yy", "en-en", "english", ""):
        r = _post(client, {"pair": pair, "text": "hello"})
        assert r.status_code == 404, (pair, r.text)
        detail = r.json()["detail"]
        assert repr(pair) in detail and "en-de" in detail and "zh-fr" in detail


def test_oversized_requests_name_the_limit(client):
    r = _post(client, {"pair": "en-de", "text": ["a"] * (LIMITS["max_texts"] + 1)})
    assert r.status_code == 413 and str(LIMITS["max_texts"]) in r.json()["detail"]
    r = _post(client, {"pair": "en-de", "text": ["ok", "x" * (LIMITS["max_text_chars"] + 1)]})
    assert r.status_code == 413
    assert "text[1]" in r.json()["detail"] and str(LIMITS["max_text_chars"]) in r.json()["detail"]
    long = " ".join(["file"] * 200)  # within the characters, over the model's 126 tokens
    r = _post(client, {"pair": "en-de", "text": ["Open", long]})
    assert r.status_code == 413 and "text[1]" in r.json()["detail"]
    assert "at most 126 tokens" in r.json()["detail"]
    r = client.post("/v1/translate", content=b'{"pair": "en-de", "text": "' + b"a" * 30000
                    + b'"}', headers={"content-type": "application/json"})
    assert r.status_code == 413 and str(LIMITS["max_body_bytes"]) in r.json()["detail"]

    def chunks():  # no Content-Length: the limit holds on the bytes read
        yield b'{"pair": "en-de", "text": "'
        for _ in range(30):
            yield b"a" * 1000
        yield b'"}'

    r = client.post("/v1/translate", content=chunks(),
                    headers={"content-type": "application/json"})
    assert r.status_code == 413
    r = _post(client, {"pair": "en-de", "text": "x", "beam": LIMITS["max_beam"] + 1})
    assert r.status_code == 422 and f"[1, {LIMITS['max_beam']}]" in r.json()["detail"]
    for bad in (0, -1):
        assert _post(client, {"pair": "en-de", "text": "x", "beam": bad}).status_code == 422
    r = _post(client, {"pair": "en-de", "text": "x", "max_len": 500})
    assert r.status_code == 422 and "[1, 127]" in r.json()["detail"]


@pytest.mark.parametrize("body", [
    b"", b"{", b"not json", b"[]", b"null", b'"en-de"', b"{}",
    b'{"pair": "en-de"}', b'{"text": "x"}', b'{"pair": "en-de", "text": 5}',
    b'{"pair": "en-de", "text": [1, 2]}', b'{"pair": "en-de", "text": []}',
    b'{"pair": "en-de", "text": "x", "beam": "4"}', b'{"pair": "en-de", "text": "x", "beam": 2.5}',
    b'{"pair": "en-de", "text": "x", "beam": true}', b'{"pair": 7, "text": "x"}',
    b'{"pair": "en-de", "text": "x", "extra": 1}', b'{"pair": "en-de", "text": "x"} trailing',
    b'{"pair": "en-de", "text": "\xff\xfe"}', b'{"pair": "en-de", "text": "\\ud800"}',
    b"[" * 5000 + b"]" * 5000,
])
def test_malformed_or_invalid_json_is_422(client, body):
    r = client.post("/v1/translate", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 422, (body[:60], r.status_code, r.text[:300])
    assert r.json()["detail"]


def test_body_is_json_whatever_the_content_type(client):
    body = json.dumps({"pair": "en-de", "text": "Open the file"}).encode()
    for ctype in ("text/plain", "application/x-www-form-urlencoded"):
        r = client.post("/v1/translate", content=body, headers={"content-type": ctype})
        assert r.status_code == 200, r.text
    r = client.post("/v1/translate", content=b"pair=en-de&text=x",
                    headers={"content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 422


def test_overload_is_503_with_retry_after_and_timeout_is_504(servers):
    """The tight server: a 4-sentence request fills the queue (its window is 10 s), the next
    gets 503 + Retry-After; the first times out with 504 after 3 s and leaves the queue."""
    url = servers["tight"].url
    with httpx.Client(base_url=url, timeout=30) as c:
        with ThreadPoolExecutor(1) as ex:
            first = ex.submit(_post, c, {"pair": "en-de", "text": SENTENCES["en"][:4]})
            deadline = time.monotonic() + 10
            while _metric(c.get("/metrics").text, "lass_serve_queue_depth") < 4:
                assert time.monotonic() < deadline, "the first request never queued"
                time.sleep(0.02)
            r = _post(c, {"pair": "de-en", "text": "Datei öffnen"})
            assert r.status_code == 503, r.text
            assert int(r.headers["retry-after"]) >= 1
            assert "queue is full" in r.json()["detail"] and "limit 4" in r.json()["detail"]
            r1 = first.result(timeout=30)
        assert r1.status_code == 504 and "3 s" in r1.json()["detail"]
        text = c.get("/metrics").text
        assert _metric(text, "lass_serve_queue_depth") == 0  # the timed-out request left
        assert _metric(text, "lass_serve_rejected_total", '{reason="queue_full"}') >= 1
        assert _metric(text, "lass_serve_rejected_total", '{reason="timeout"}') >= 1
        assert _metric(text, "lass_serve_batches_total") == 0  # nothing ran for it
        assert c.get("/health").status_code == 200


def test_metrics_are_prometheus_text(client):
    _post(client, {"pair": "fr-en", "text": SENTENCES["fr"][:2]})
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    sample = re.compile(r'^[a-zA-Z_:][a-zA-Z0-9_:]*(\{[a-z_]+="[^"]*"(,[a-z_]+="[^"]*")*\})? '
                        r"[-+0-9.eInf]+$")
    for line in text.splitlines():
        assert line.startswith("# HELP ") or line.startswith("# TYPE ") or sample.match(line), \
            line
    for name, kind in (("lass_serve_requests_total", "counter"),
                       ("lass_serve_queue_depth", "gauge"),
                       ("lass_serve_batch_sentences", "histogram"),
                       ("lass_serve_request_seconds", "histogram"),
                       ("lass_serve_queue_seconds", "histogram"),
                       ("lass_serve_batch_seconds", "histogram")):
        assert f"# TYPE {name} {kind}" in text
    assert _metric(text, "lass_serve_requests_total", '{route="/v1/translate",code="200"}') >= 1
    assert _metric(text, "lass_serve_sentences_total", '{pair="fr-en"}') >= 2
    count = _metric(text, "lass_serve_request_seconds_count")
    assert count >= 1 and _metric(text, "lass_serve_request_seconds_bucket",
                                  '{le="+Inf"}') == count


def test_fuzzed_json_bodies_never_break_the_server(client, servers):
    """Random JSON (and random bytes) as bodies: only 200/404/413/422, the server stays up,
    its memory does not grow, and random URLs do not add metric labels."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    scalars = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(
        max_size=40)
    values = st.recursive(scalars, lambda c: st.lists(c, max_size=4)
                          | st.dictionaries(st.text(max_size=8), c, max_size=4), max_leaves=12)
    pair = st.sampled_from(SUPERVISED + ZERO_SHOT + ["xx-yy", ""]) | st.text(max_size=6)
    text = st.text(max_size=30) | st.lists(st.text(max_size=20), max_size=3) | values
    request = st.fixed_dictionaries(
        {"pair": pair, "text": text},
        optional={"beam": st.integers(-3, 9) | values, "max_len": st.integers(-3, 200) | values,
                  "junk": values})
    bodies = (request.map(lambda d: json.dumps(d).encode())
              | values.map(lambda v: json.dumps(v).encode()) | st.binary(max_size=200))
    ok = {200, 404, 413, 422}
    server = servers["main"]
    for _ in range(3):  # warm up, then measure
        _post(client, {"pair": "en-de", "text": ["Open the file", "Close"], "beam": 4})
    rss0 = server.rss_bytes()

    @settings(max_examples=80, deadline=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(bodies)
    def check(body):
        r = client.post("/v1/translate", content=body,
                        headers={"content-type": "application/json"})
        assert r.status_code in ok, (body[:200], r.status_code, r.text[:300])
        if r.status_code == 200:
            assert all(isinstance(t, str) for t in r.json()["translations"])

    check()
    for i in range(20):
        client.get(f"/no/such/path/{i}")
        client.post(f"/v1/translate/{i}", content=b"{}")
    assert client.get("/health").status_code == 200
    grown = server.rss_bytes() - rss0
    assert grown < 64 << 20, f"server RSS grew by {grown >> 20} MiB over the fuzz"
    text = client.get("/metrics").text
    routes = set(re.findall(r'lass_serve_requests_total\{route="([^"]*)"', text))
    assert routes <= {"/v1/translate", "/v1/pairs", "/health", "/metrics", "/", "/v1/config",
                      "/openapi.json", "other"}, routes


# ------------------------------------------------------------------------------ shutdown


def test_sigterm_drains_queued_requests_then_exits_0(servers):
    """Three requests wait in the tight server's 10 s window; SIGTERM runs them at once,
    answers them all, refuses new connections and exits 0. (Runs last on that server.)"""
    srv = servers["tight"]
    url = srv.url
    with httpx.Client(base_url=url, timeout=30) as c, ThreadPoolExecutor(3) as ex:
        futs = [ex.submit(_post, c, {"pair": p, "text": "Open the file"})
                for p in ("en-de", "en-fr", "en-zh")]
        deadline = time.monotonic() + 10
        while _metric(c.get("/metrics").text, "lass_serve_queue_requests") < 3:
            assert time.monotonic() < deadline, "the requests never queued"
            time.sleep(0.02)
        t0 = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        results = [f.result(timeout=30) for f in futs]
        assert time.monotonic() - t0 < 5, "the window was not flushed on shutdown"
    assert [r.status_code for r in results] == [200, 200, 200]
    assert all(r.json()["translation"] for r in results)
    assert results[0].json()["timings"]["batch_pairs"] == 3
    assert srv.proc.wait(30) == 0, "".join(srv.output[-20:])
    host, port = url.removeprefix("http://").split(":")
    with pytest.raises(OSError):
        socket.create_connection((host, int(port)), timeout=2).close()


# ------------------------------------------------------------------------------ the page


def _browser() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.mark.skipif(_browser() is None, reason="no headless browser (chromium) installed: "
                    "apt-get install chromium")
def test_page_in_a_headless_browser(url, client):
    """The page lists the pairs from /v1/pairs, and its form posts the text and shows the
    translation the API gives (the page's own submit handler, run by ?run=1)."""
    want = _post(client, {"pair": "de-en", "text": ["Datei öffnen"], "beam": 4}).json()
    page = f"{url}/?pair=de-en&text=Datei%20%C3%B6ffnen&beam=4&run=1"
    out = subprocess.run([_browser(), "--headless", "--disable-gpu", "--no-sandbox",
                          "--no-first-run", "--disable-extensions",
                          "--virtual-time-budget=15000", "--dump-dom", page],
                         capture_output=True, text=True, timeout=60)
    dom = out.stdout
    assert f'data-loaded="{N_PUBLISHED}"' in dom, (out.stderr[-500:], dom[-2000:])
    assert dom.count("<option") == N_PUBLISHED and 'label="zero-shot (merged masks)"' in dom
    m = re.search(r'<div id="output"[^>]*>(.*?)</div>', dom, re.S)
    assert m, dom[-2000:]
    import html

    assert html.unescape(m.group(1)) == want["translations"][0]
    assert 'data-done="1"' in dom
    assert re.search(r'<div id="error" role="alert"></div>', dom)


# ------------------------------------------------------------------------------ the CLI


def test_cli_errors_are_one_line(capsys, tmp_path):
    from lass_sparse.cli import main

    def err(argv):
        try:
            code = main(argv)
        except SystemExit as e:  # argparse's errors
            code = e.code
        e = capsys.readouterr().err
        assert code != 0 and e.startswith("lass-sparse: error:") and "Traceback" not in e, e
        assert e.count("\n") == 1, e
        return e

    assert "not a run folder" in err(["serve", "--run", str(tmp_path)])
    e = err(["serve", "--run", RUN, "--stage", "nope", "--port", "0"])
    assert "--stage nope" in e and "lass" in e and "theta0" in e
    e = err(["serve", "--run", RUN, "--stage", "lass", "--masks", "masks.safetensors",
             "--pairs", "en-de", "xx-yy", "--port", "0"])
    assert "xx-yy" in e and "zh-fr" in e
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert "already in use" in err(["serve", "--run", RUN, "--port", str(port)])
    assert "--max-texts" in err(["serve", "--run", RUN, "--max-texts", "10", "--max-queue", "5"])
    e = err(["serve", "--run", RUN, "--hf-model", RUN])
    assert "not allowed with argument" in e
    assert "--stage goes with --run" in err(["serve", "--hf-model", str(tmp_path), "--stage",
                                             "x", "--port", "0"])
