"""``lass-sparse recipe`` end to end at toy scale: both variants, controls, α selection on
validation, zero-shot grid, significance, diagnostics, report, resume."""

from __future__ import annotations

import json
import os

import pytest

pytest.importorskip("sentencepiece")
pytest.importorskip("sacrebleu")
pytest.importorskip("matplotlib")

from lass_sparse.cli import main  # noqa: E402

TOY = ["--corpus", "demo", "--pairs", "en-de", "en-zh", "--max-train", "150", "--vocab-size",
       "600", "--steps", "base=8", "--steps", "finetune=4", "--steps", "joint=6",
       "--validate-every", "base=4", "--validate-every", "finetune=2", "--validate-every",
       "joint=3", "--valid-limit", "6", "--limit", "6", "--beam", "1", "--bootstrap", "30",
       "--threads", "1", "--quiet", "--max-tokens", "600", "--config", "tiny"]


@pytest.fixture(scope="module")
def variants(tmp_path_factory):
    d = tmp_path_factory.mktemp("recipe-run")
    src, tgt, out = str(d / "src"), str(d / "tgt"), str(d / "out")
    assert main(["recipe", "variant", "--run", src, "--langtok", "src", "--controls"] + TOY) == 0
    assert main(["recipe", "variant", "--run", tgt, "--langtok", "tgt", "--zero-shot-only",
                 "--seed-check", "en-de"] + TOY) == 0
    assert main(["recipe", "report", "--runs", src, tgt, "--out", out]) == 0
    return src, tgt, out


def _variant(run_dir):
    with open(os.path.join(run_dir, "parts", "variant.json")) as f:
        return json.load(f)


def test_src_variant_scores_every_system_and_control(variants):
    v = _variant(variants[0])
    assert v["langtok"] == "src"
    assert set(v["results"]) == {"dense", "theta0", "LaSS", "LaSS-noout", "shared", "random"}
    zs = ["de-zh", "zh-de"]
    assert v["zero_shot"] == zs
    for r in v["results"].values():
        assert set(r) == {"en-de", "de-en", "en-zh", "zh-en", *zs}
        assert all(x["n"] == 6 for x in r.values())
    assert set(v["significance"]["supervised"]) == {"theta0", "LaSS", "LaSS-noout", "shared",
                                                    "random"}
    # α chosen on validation loss, never on test
    losses = {float(a): x for a, x in v["alpha_valid_loss"].items()}
    assert v["alpha"] == min(losses, key=losses.get)
    for stage in ("base", "joint-a0.5", "joint-a0.7", "dense", "joint-noout"):
        assert v["curves"][stage], stage  # validation curves recorded for every stage
    assert os.path.exists(os.path.join(variants[0], "masks-noout.safetensors"))


def test_masks_without_output_projection_and_shared_control(variants):
    import lass_sparse as ls

    src = variants[0]
    v = _variant(src)
    lass = ls.MaskBank.load(os.path.join(src, f"masks-a{v['alpha']}.safetensors"))
    noout = ls.MaskBank.load(os.path.join(src, "masks-noout.safetensors"))
    out_proj = "decoder.output_projection.weight"
    assert out_proj in lass.names and out_proj not in noout.names
    assert set(noout.names) == set(lass.names) - {out_proj}
    shared = ls.MaskBank.load(os.path.join(src, "masks-shared.safetensors"))
    assert shared.similarity("en-de", "zh-en") == 1.0
    assert lass.similarity("en-de", "zh-en") < 1.0


def test_tgt_variant_zero_shot_grid_and_seed_diagnostics(variants):
    v = _variant(variants[1])
    assert v["langtok"] == "tgt" and not v["supervised_evaluated"]
    assert set(next(iter(v["results"].values()))) == {"de-zh", "zh-de"}
    dg = v["diagnostics"]
    assert set(dg["seed_pairs"]) == {"en-de"} and 0.0 < dg["seed_pairs"]["en-de"] <= 1.0
    assert 0.0 < dg["cross_direction_mean"] <= 1.0 and 0.0 < dg["union_coverage"] <= 1.0


def test_report_and_resume(variants):
    src, tgt, out = variants
    md = open(os.path.join(out, "reproduction.md")).read()
    for head in ("## Protocol", "## Convergence", "## Supervised directions",
                 "## Zero-shot: language tag × output-projection mask", "## Mask diagnostics",
                 "Paired bootstrap, LaSS vs dense"):
        assert head in md, head
    assert "| LaSS-noout |" in md
    for png in ("curves.png", "similarity.png", "layer_similarity.png"):
        assert os.path.getsize(os.path.join(out, png)) > 1000, png
    before = os.path.getmtime(os.path.join(src, "parts", "variant.json"))
    assert main(["recipe", "variant", "--run", src, "--langtok", "src"] + TOY) == 0
    assert os.path.getmtime(os.path.join(src, "parts", "variant.json")) == before


def test_publish_gives_a_small_run_folder_that_evaluate_scores(variants, tmp_path):
    import hashlib

    import torch
    from safetensors.torch import load_file

    src = variants[0]
    pub = str(tmp_path / "models")
    assert main(["recipe", "publish", "--run", src, "--out", pub]) == 0
    sd = load_file(os.path.join(pub, "lass", "ckpt", "model.safetensors"))
    assert all(t.dtype == torch.bfloat16 for t in sd.values())
    for f in ("run.json", "spm.model", "masks.safetensors", "theta0/ckpt/state.json"):
        assert os.path.exists(os.path.join(pub, f)), f
    from lass_sparse.lass.recipe import publish

    sums = publish(src, pub)  # deterministic: same bytes again
    with open(os.path.join(pub, "masks.safetensors"), "rb") as fh:
        assert sums["masks.safetensors"] == hashlib.sha256(fh.read()).hexdigest()
    test = os.path.join(os.path.dirname(__file__), "..", "lass_sparse", "data", "demo",
                        "test.tsv.gz")
    out = str(tmp_path / "ev")
    assert main(["evaluate", "--run", pub, "--system", "theta0=theta0", "--system",
                 "lass=lass@masks.safetensors", "--baseline", "dense", "--test", test,
                 "--directions", "en-de", "zh-en", "--limit", "4", "--beam", "1", "--quiet",
                 "--out", out]) == 0
    rep = json.load(open(out + ".json"))
    assert set(rep["results"]) == {"baseline", "theta0", "lass"}
