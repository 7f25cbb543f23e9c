"""``lass-sparse serve --hf-model DIR``: a real server process on a tiny random Marian LaSS
folder (built here from a config, no hub); its answers to concurrent requests over every
direction, zero-shot included, equal the offline ``lass_sparse.hf.translate``, token for token."""

from __future__ import annotations

import copy
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("transformers")
httpx = pytest.importorskip("httpx")

import torch  # noqa: E402

from lass_sparse.serve.process import ServerProcess  # noqa: E402

PAIRS = ["en-de", "de-en", "en-fr", "fr-en"]
TEXTS = {"en": ["Open the file", "Save the document", "Print"],
         "de": ["Datei öffnen", "Drucken"], "fr": ["Ouvrir le fichier", "Imprimer"]}


@pytest.fixture(scope="module")
def lass_folder(tmp_path_factory):
    """A Marian toy model with a random-perturbation 'fine-tune' mask per direction, saved as a
    LaSS folder with its tokenizer."""
    from lass_sparse.hf import LaSSConfig, get_lass_model
    from lass_sparse.hf.pipeline import load
    from lass_sparse.hf.toy import make_toy_model

    base_dir = str(tmp_path_factory.mktemp("hf_base"))
    make_toy_model(base_dir, "marian", pairs=("en-de", "en-fr"), max_train=150, vocab_size=300,
                   d_model=16, init_std=0.5)
    base, tok = load(base_dir)
    model = get_lass_model(copy.deepcopy(base), LaSSConfig(alpha=0.5))
    for i, p in enumerate(PAIRS):
        ft = copy.deepcopy(base)
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for w in ft.parameters():
                w.add_(torch.randn(w.shape, generator=g) * 0.05)
        model.add_pair(p, ft)
    out = str(tmp_path_factory.mktemp("hf_lass"))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_hf_server_equals_offline_translate(lass_folder):
    from lass_sparse.hf.data import translate
    from lass_sparse.hf.pipeline import load

    srv = ServerProcess(["--hf-model", lass_folder, "--max-wait-ms", "50", "--log-level",
                         "warning"])
    with srv:
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            pairs = c.get("/v1/pairs").json()
            assert pairs["supervised"] == PAIRS
            assert pairs["zero_shot"] == ["de-fr", "fr-de"]
            assert c.get("/health").json()["engine"] == "hf"
            reqs = [{"pair": p, "text": TEXTS[p.split("-")[0]][: 1 + i % 2], "beam": beam,
                     "max_len": 12}
                    for i, p in enumerate(pairs["pairs"]) for beam in (1, 3)]
            barrier = threading.Barrier(len(reqs))

            def send(body):
                barrier.wait(timeout=10)
                return c.post("/v1/translate", json=body)

            with ThreadPoolExecutor(len(reqs)) as ex:
                responses = list(ex.map(send, reqs))
            r404 = c.post("/v1/translate", json={"pair": "de-zh", "text": "x"})
            assert r404.status_code == 404 and "fr-de" in r404.json()["detail"]
    model, tok = load(lass_folder)
    mixed = 0
    for body, r in zip(reqs, responses):
        assert r.status_code == 200, r.text
        want = translate(model, tok, body["text"], body["pair"], num_beams=body["beam"],
                         max_new_tokens=body["max_len"])
        assert r.json()["translations"] == want, body
        mixed += r.json()["timings"]["batch_pairs"] > 1
    assert mixed > 0, "no batch mixed pairs"
