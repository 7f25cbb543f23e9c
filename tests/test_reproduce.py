"""``lass-sparse reproduce`` end to end on a toy run (every part, resume, report), and the
multi-direction ``extend`` it relies on."""

from __future__ import annotations

import json
import os

import pytest
import torch

pytest.importorskip("sentencepiece")
pytest.importorskip("sacrebleu")

import lass_sparse as ls  # noqa: E402
from lass_sparse.cli import main  # noqa: E402
from lass_sparse.lass import pipeline as P  # noqa: E402
from lass_sparse.lass.reproduce import DEFAULT_STEPS, _steps  # noqa: E402

SMALL = dict(d_model=32, heads=2, ffn=64, enc_layers=1, dec_layers=1, dropout=0.1)
STEPS = ["base=4", "finetune=2", "joint=3", "sweep_joint=2", "ext_base=3", "ext_joint=2",
         "extend_ft=2", "extend=4", "extend_eval_every=2"]


@pytest.fixture(scope="module")
def repro(tmp_path_factory):
    d = tmp_path_factory.mktemp("repro")
    run_dir, out = str(d / "run"), str(d / "out")
    # a toy run folder; `reproduce` reopens it instead of preparing its own
    P.prepare(run_dir, "demo", "tiny", vocab_size=900, pairs=["en-de", "en-fr", "en-zh"],
              max_train=120, **SMALL)
    argv = ["reproduce", "--corpus", "demo", "--run", run_dir, "--out", out, "--limit", "4",
            "--beam", "2", "--batch-size", "8", "--quiet", "--bootstrap", "50",
            "--zero-shot", "de", "fr", "zh",
            "--held-out", "zh", "--alpha-langs", "de", "--alphas", "0.3", "0.6", "--alpha",
            "0.6", "--threads", "1"]
    for s in STEPS:
        argv += ["--steps", s]
    assert main(argv) == 0
    return run_dir, out, argv


def test_report_has_every_table_and_figure(repro):
    run_dir, out, _ = repro
    md = open(os.path.join(out, "reproduction.md")).read()
    for head in ("Table 1 analogue", "Table 3 analogue", "α sweep", "Extension", "Figures"):
        assert head in md
    for png in ("similarity.png", "layer_similarity.png", "extension.png"):
        assert os.path.getsize(os.path.join(out, png)) > 1000
    rep = json.load(open(os.path.join(out, "reproduction.json")))
    main_res = rep["parts"]["main"]["results"]
    assert set(main_res) == {"baseline", "theta0", "LaSS", "random", "shared"}
    sig = rep["parts"]["main"]["significance"]
    assert set(sig["supervised"]) == {"theta0", "LaSS", "random", "shared"}
    assert set(sig["supervised"]["LaSS"]["directions"]) == set(rep["directions"])
    assert 0.0 <= sig["supervised"]["LaSS"]["pooled"]["bleu"]["p_value"] <= 1.0
    assert "Paired bootstrap, LaSS vs baseline" in md
    assert len(rep["zero_shot"]) == 6
    for system in main_res.values():  # 6 supervised + 6 zero-shot directions, each scored
        assert len(system) == 12 and all(r["n"] == 4 for r in system.values())
    assert set(rep["parts"]["sweep"]["results"]) == {"0.3", "0.6"}
    assert rep["parts"]["sweep"]["directions"] == ["en-de", "de-en"]
    ext = rep["parts"]["ext"]
    assert ext["held"] == ["en-zh", "zh-en"]
    for pts in ext["curves"].values():
        assert [p["step"] for p in pts] == [0, 2, 4]
    # the extension baseline is dense all the way (its own dense phase, not the LaSS model)
    assert set(ext["before"]) == {"baseline", "LaSS"}
    state = json.load(open(os.path.join(run_dir, "ext", "baseline", "ckpt", "state.json")))
    assert state["step"] == 2  # ext_joint steps
    assert "--steps extend=4" in rep["command"]
    assert rep["stage_seconds"]["base"] > 0
    fam = rep["similarity_family"]["en→X"]  # de, fr, zh: no two share a family
    assert fam["n_same"] == 0 and fam["n_different"] == 3 and 0 < fam["different_family"] <= 1
    assert "Mask similarity by language family" in md


def test_strict_extension_left_old_pairs_bit_identical(repro):
    run_dir, _, _ = repro
    run = P.open_run(run_dir)
    before, after = run.load_model("ext/joint"), run.load_model("ext/strict")
    bank = ls.MaskBank.load(run.path("ext/strict/masks.safetensors"))
    assert {"en-zh", "zh-en"} <= set(bank.pairs)
    old = bank.union([p for p in bank.pairs if "zh" not in p])
    moved = 0
    for name, p in before.named_parameters():
        q = after.get_parameter(name)
        if name in old:
            keep = ls.unpack_mask(old[name], bank.shapes[name][-1])
            assert torch.equal(p[keep], q[keep]), name
            moved += int((p[~keep] != q[~keep]).sum())
        else:
            assert torch.equal(p, q), name
    assert moved > 0  # the new pair's free weights did train


def test_rerun_resumes_from_the_saved_parts(repro):
    run_dir, out, argv = repro
    stamp = os.path.getmtime(os.path.join(run_dir, "parts", "main.json"))
    n = sum(1 for _ in open(os.path.join(run_dir, "parts", "timings.json")))
    assert main(argv) == 0
    assert os.path.getmtime(os.path.join(run_dir, "parts", "main.json")) == stamp
    assert sum(1 for _ in open(os.path.join(run_dir, "parts", "timings.json"))) == n


def test_steps_overrides_and_scale():
    st = _steps(0.5, ["base=10"])
    assert st["base"] == 5 and st["joint"] == DEFAULT_STEPS["joint"] // 2
    with pytest.raises(ValueError, match="KEY=N"):
        _steps(1.0, ["bogus=3"])
    with pytest.raises(ValueError, match="KEY=N"):
        _steps(1.0, ["base"])


def test_extend_rejects_a_direction_already_in_the_bank(repro):
    run = P.open_run(repro[0])
    with pytest.raises(ValueError, match="already has a mask"):
        P.extend(run, ["en-de", "en-zh"], masks="masks.safetensors", init="joint", ft_steps=1,
                 steps=1, out="x")


def test_gpu_preset_fills_defaults_and_explicit_flags_win(tmp_path):
    """`reproduce --preset gpu` (sized for one GPU) run end to end on the CPU at a tiny scale:
    preset values where flags were left at their defaults, explicit flags kept."""
    from lass_sparse.cli import main
    from lass_sparse.lass import pipeline as P
    from lass_sparse.lass.checkpoint import read_state

    run, out = str(tmp_path / "run"), str(tmp_path / "out")
    rc = main(["reproduce", "--preset", "gpu", "--corpus", "demo", "--pairs", "en-de", "en-fr",
               "--config", "tiny", "--vocab-size", "400", "--scale", "0.002", "--limit", "3",
               "--zero-shot", "de", "fr", "--device", "cpu", "--amp", "none", "--beam", "1",
               "--run", run, "--out", out, "--quiet"])
    assert rc == 0
    md = open(os.path.join(out, "reproduction-gpu.md")).read()
    assert "--preset gpu" in md and "--config tiny" in md
    assert os.path.exists(os.path.join(out, "reproduction-gpu-similarity.png"))
    assert not os.path.exists(os.path.join(out, "reproduction.md"))
    r = P.open_run(run, "cpu")
    assert r.model_config.d_model == 128 and r.tok.vocab_size <= 400  # explicit flags won
    cfg = read_state(r.path("base", "ckpt"))["config"]
    assert cfg["steps"] == 7 and cfg["lr"] == 5e-4 and cfg["warmup"] == 1000  # 3500 × 0.002
    assert cfg["max_tokens"] == 8192 and cfg["validate_every"] == 500
    assert not os.path.exists(r.path("parts", "ext.json"))  # main + report only
