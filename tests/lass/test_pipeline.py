"""LaSS pipeline smoke test on a few hundred sentences: every stage, resume, beam cache, metrics."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

pytest.importorskip("sentencepiece")
pytest.importorskip("sacrebleu")

import lass_sparse as ls  # noqa: E402
from lass_sparse.lass import pipeline as P  # noqa: E402
from lass_sparse.lass.train import encode_source, encoder_lang, pad_batch  # noqa: E402
from lass_sparse.lass.translate import beam_search, ensure_pair  # noqa: E402
from lass_sparse.mt.corpus import load_corpus  # noqa: E402

SMALL = dict(d_model=32, heads=2, ffn=64, enc_layers=1, dec_layers=2, dropout=0.1)
KW = dict(batch_size=16, progress=False, ckpt_every=2)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("run"))
    r = P.prepare(d, "demo", "tiny", vocab_size=400, pairs=["en-de", "en-fr"], max_train=150,
                  **SMALL)
    P.train(r, 6, out="base", **KW)
    for direction in r.directions:
        P.finetune(r, direction, 3, **KW)
    P.prune(r, 0.5, out="masks.safetensors")
    P.joint(r, "masks.safetensors", 4, out="joint", **KW)
    return r


def test_prune_gives_the_requested_sparsity_per_tensor(run):
    bank = ls.MaskBank.load(run.path("masks.safetensors"))
    assert sorted(bank.pairs) == sorted(run.directions) == ["de-en", "en-de", "en-fr", "fr-en"]
    for name, shape in bank.shapes.items():
        rows, k = shape
        mask = ls.unpack_mask(bank.bits("en-de", name), k)
        chunks = 3 if name.endswith("in_proj_weight") else 1
        for c in mask.chunk(chunks, 0):
            assert int(c.sum()) == c.numel() - int(0.5 * c.numel()), name


def test_joint_training_leaves_weights_outside_every_mask_unchanged(run):
    base, joint = run.load_model("base"), run.load_model("joint")
    bank = ls.MaskBank.load(run.path("masks.safetensors"))
    union = bank.union(bank.pairs)
    registered = dict(base.named_parameters())
    assert "decoder.output_projection.weight" in union  # masked, but it is the embedding:
    changed = 0
    for name, bits in union.items():
        if name not in registered:  # the tied head's matrix trains densely (lookup uses it)
            continue
        off = ~ls.unpack_mask(bits, bank.shapes[name][-1])
        a, b = base.get_parameter(name), joint.get_parameter(name)
        assert torch.equal(a[off], b[off]), name
        changed += int((a[~off] != b[~off]).sum())
    assert changed > 0
    assert not torch.equal(base.embed.weight, joint.embed.weight)  # shared params do train


def test_zero_shot_mask_is_encoder_of_x_en_plus_decoder_of_en_y(run):
    bank = ls.MaskBank.load(run.path("masks.safetensors"))
    assert ensure_pair(bank, "de-fr") == "de-fr"
    for n in bank.names:
        src = "de-en" if n.startswith("encoder.") else "en-fr"
        assert n.startswith(("encoder.", "decoder.")), n
        assert torch.equal(bank.bits("de-fr", n), bank.bits(src, n)), n
    with pytest.raises(KeyError, match="known pairs"):
        ensure_pair(bank, "ru-zh")


def test_beam_search_with_kv_cache_equals_without(run):
    model = run.load_model("joint")
    bank = ls.MaskBank.load(run.path("masks.safetensors"))
    ls.attach(model, bank)
    src, _ = run.corpus.eval_set("test", "en-de", 6)
    lang = encoder_lang("en-de", run.langtok)
    ids = [encode_source(run.tok, s, lang, model.config.max_len) for s in run.tok.encode(src)]
    x = pad_batch(ids)
    bos = run.tok.lang_id("de")
    with ls.active_pair(model, "en-de"):
        for beam in (1, 3):
            a = beam_search(model, x, bos, beam, max_len=12, use_cache=True)
            b = beam_search(model, x, bos, beam, max_len=12, use_cache=False)
            assert a == b


def test_evaluation_matches_sacrebleu_called_directly(run):
    import sacrebleu

    res = P.evaluate(run, {"joint": ("joint", "masks.safetensors")}, ["en-de", "de-fr"],
                     limit=8, beam=2, progress=False)
    for d in ("en-de", "de-fr"):
        src, refs = run.corpus.eval_set("test", d, 8)
        hyps = P.translate_texts(run, "joint", d, src, masks="masks.safetensors", beam=2)
        assert res["joint"][d]["bleu"] == pytest.approx(
            sacrebleu.corpus_bleu(hyps, [refs]).score)
        assert res["joint"][d]["chrf"] == pytest.approx(
            sacrebleu.corpus_chrf(hyps, [refs]).score)
        assert 0.0 <= res["joint"][d]["acc"] <= 1.0
    from lass_sparse.mt.report import render_table

    table = render_table(res, ["en-de", "de-fr"])
    assert "| en-de |" in table and "average" in table


def test_materialize_translates_as_the_fused_kernels(run, tmp_path, monkeypatch):
    """``materialize`` (CLI ``--materialize``): the dense ops on W ⊙ M kept per layer — the
    same hypotheses as the fused kernels (a near-tie could flip one: at most one here), with
    masked_cast run once per masked weight, not per decoding step."""
    from lass_sparse.cli import main

    src, _ = run.corpus.eval_set("test", "en-de", 8)
    fused = P.translate_texts(run, "joint", "en-de", src, masks="masks.safetensors", beam=2)
    calls = []
    real = ls.ops.masked_cast
    monkeypatch.setattr(ls.ops, "masked_cast", lambda *a: calls.append(1) or real(*a))
    kept = P.translate_texts(run, "joint", "en-de", src, masks="masks.safetensors", beam=2,
                             materialize=True)
    assert sum(a != b for a, b in zip(fused, kept)) <= 1
    n8 = len(calls)
    calls.clear()
    P.translate_texts(run, "joint", "en-de", src[:1], masks="masks.safetensors", beam=1,
                      materialize=True)
    assert n8 == len(calls) > 0  # once per weight (row block) used, not per step or sentence
    inp = tmp_path / "in.txt"
    inp.write_text("\n".join(src[:2]) + "\n")
    out = tmp_path / "out.txt"
    assert main(["translate", "--run", run.dir, "--stage", "joint", "--pair", "en-de",
                 "--masks", "masks.safetensors", "--beam", "2", "--materialize", "--input",
                 str(inp), "--output", str(out)]) == 0
    assert len(out.read_text().splitlines()) == 2


def test_extend_strict_keeps_old_pairs_bit_identical(run):
    old = run.load_model("joint")
    bank = ls.MaskBank.load(run.path("masks.safetensors"))
    bank.remove_pair("fr-en")
    bank.save(run.path("masks-3.safetensors"))
    out = P.extend(run, "fr-en", masks="masks-3.safetensors", ft_steps=2, steps=3, strict=True,
                   init="joint", out="extend-strict", **KW)
    new = run.load_model("extend-strict")
    full = ls.MaskBank.load(out["masks"])
    assert "fr-en" in full
    others = full.union([p for p in full.pairs if p != "fr-en"])
    for name, p_old in old.named_parameters():
        p_new = new.get_parameter(name)
        if name in others:  # old pairs' weights untouched
            keep = ls.unpack_mask(others[name], full.shapes[name][-1])
            assert torch.equal(p_old[keep], p_new[keep]), name
        else:  # shared params frozen under --strict
            assert torch.equal(p_old, p_new), name


def test_cli_extend_adds_both_directions_of_a_pair(run, capsys):
    from lass_sparse.cli import main

    bank = ls.MaskBank.load(run.path("masks.safetensors"))
    for d in ("en-fr", "fr-en"):
        bank.remove_pair(d)
    bank.save(run.path("masks-de.safetensors"))
    rc = main(["extend", "--run", run.dir, "--pair", "en-fr", "fr-en", "--masks",
               "masks-de.safetensors", "--init", "joint", "--ft-steps", "2", "--steps", "3",
               "--batch-size", "16", "--quiet"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["finetune"]) == {"en-fr", "fr-en"} and out["train"]["steps"] == 3
    full = ls.MaskBank.load(out["masks"])
    assert sorted(full.pairs) == sorted(run.directions)
    for d in ("en-fr", "fr-en"):  # each new direction got its own fine-tuned mask
        assert os.path.exists(run.path("extend", "en-fr+fr-en", "ft", d, "ckpt"))
    assert full.similarity("en-fr", "fr-en") < 1.0


def test_cli_extend_a_pivoted_pair_into_its_own_folder(run, capsys):
    """A pair the model never saw (de-fr, built through English) added with --out."""
    from lass_sparse.cli import main

    rc = main(["extend", "--run", run.dir, "--pair", "de-fr", "fr-de", "--masks",
               "masks.safetensors", "--init", "joint", "--ft-steps", "2", "--steps", "2",
               "--batch-size", "16", "--quiet", "--out", "ext-defr"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["masks"] == run.path("ext-defr", "masks.safetensors")
    full = ls.MaskBank.load(out["masks"])
    assert sorted(full.pairs) == sorted(run.directions + ["de-fr", "fr-de"])
    assert os.path.exists(run.path("ext-defr", "ft", "de-fr", "ckpt"))
    assert 0 < len(run.corpus.examples("de-fr")) <= 150  # pivoted, capped by max_train


def test_resume_after_sigkill_is_bit_identical(run, tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    for d in (a, b):
        os.makedirs(d)
        for f in ("run.json", "spm.model"):
            shutil.copy(run.path(f), os.path.join(d, f))
    total = 40
    cmd = [sys.executable, "-m", "lass_sparse.cli", "train", "--run", None, "--steps", str(total),
           "--ckpt-every", "1", "--batch-size", "8", "--quiet"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([c if c else a for c in cmd], check=True, env=env, capture_output=True)
    proc = subprocess.Popen([c if c else b for c in cmd], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    import json

    state = os.path.join(b, "base", "ckpt", "state.json")
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(state) and json.load(open(state))["step"] >= 3:  # atomic writes
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = json.load(open(state))["step"]
    assert 3 <= killed_at < total, "the kill must interrupt training"
    subprocess.run([c if c else b for c in cmd], check=True, env=env, capture_output=True)
    ra, rb = P.open_run(a), P.open_run(b)
    ma, mb = ra.load_model("base"), rb.load_model("base")
    for (n, x), y in zip(ma.state_dict().items(), mb.state_dict().values()):
        assert torch.equal(x, y), n


def test_bad_input_messages(run, tmp_path, capsys):
    with pytest.raises(KeyError, match="unknown language pair 'en-xx'"):
        load_corpus("demo", pairs=["en-xx"])
    with pytest.raises(FileNotFoundError, match="no checkpoint for stage 'nope'"):
        run.load_model("nope")
    with pytest.raises(FileNotFoundError, match="not a run folder"):
        P.open_run(str(tmp_path / "empty"))
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    with gzip.open(corpus / "train.en-de.tsv.gz", "wt") as f:
        f.write("Open file\tDatei öffnen\nbroken line without tab\nSave\tSpeichern\n\t\n")
    c = load_corpus(str(corpus))
    assert c.train["en-de"] == [("Open file", "Datei öffnen"), ("Save", "Speichern")]
    assert len(c.skipped) == 2 and "train.en-de.tsv.gz:2:" in c.skipped[0]
    out = tmp_path / "out.txt"
    out.write_text("keep me")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    from lass_sparse.cli import main

    rc = main(["translate", "--run", run.dir, "--stage", "joint", "--pair", "en-de",
               "--input", str(empty), "--output", str(out)])
    assert rc == 1 and "empty input" in capsys.readouterr().err
    assert out.read_text() == "keep me"


def test_translation_accuracy_and_win_ratio():
    from lass_sparse.mt.metrics import translation_accuracy, win_ratio

    assert translation_accuracy(["Das ist eine Datei auf dem Computer", ""], "de") == 0.5
    assert translation_accuracy(["This is a file on the computer"], "de") == 0.0
    assert win_ratio({"a": 2.0, "b": 1.0, "c": 3.0}, {"a": 1.0, "b": 2.0, "c": 3.0}) == 1 / 3
