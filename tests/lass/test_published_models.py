"""The models published with the reproduction (results/models): the files are those whose sha256
the report in results/ lists, they fit the 30 MB budget, and they load and translate."""

from __future__ import annotations

import hashlib
import os
import re

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ROOT = os.path.join(REPO, "results")
MODELS = os.path.join(ROOT, "models")
ROW = re.compile(r"^\| `([^`]+)` \| [0-9.]+ MB \| `([0-9a-f]{64})` \|$")

pytestmark = pytest.mark.skipif(not os.path.exists(os.path.join(MODELS, "run.json")),
                                reason="no published models in results/models")


def _listed() -> dict[str, str]:
    reports = [open(os.path.join(ROOT, f), encoding="utf-8").read()
               for f in sorted(os.listdir(ROOT)) if f.endswith(".md")]
    listing = [md for md in reports if "## Published models" in md]
    if len(listing) != 1:
        pytest.fail(f"results/models is published: exactly one report in results/ must list it "
                    f"(found {len(listing)})")
    section = listing[0].split("## Published models", 1)[1].split("\n## ", 1)[0]
    return {m.group(1): m.group(2) for m in map(ROW.match, section.splitlines()) if m}


def test_published_files_match_the_listed_sha256_and_fit_30_mb():
    listed = _listed()
    on_disk = {os.path.relpath(os.path.join(r, f), MODELS)
               for r, _, fs in os.walk(MODELS) for f in fs}
    assert set(listed) == on_disk, "results/models and the sha256 table disagree"
    total = 0
    for rel, sha in listed.items():
        with open(os.path.join(MODELS, rel), "rb") as f:
            data = f.read()
        total += len(data)
        assert hashlib.sha256(data).hexdigest() == sha, rel
    assert total <= 30e6


def test_published_models_load_and_translate():
    import torch

    from lass_sparse.lass import pipeline as P

    torch.manual_seed(0)
    run = P.open_run(MODELS, device="cpu")
    for stage, masks in (("theta0", None), ("dense", None), ("lass", "masks.safetensors")):
        out = P.translate_texts(run, stage, "en-de", ["Open the file."], masks=masks, beam=2)
        assert len(out) == 1 and out[0].strip(), (stage, out)
