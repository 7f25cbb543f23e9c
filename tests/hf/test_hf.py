"""lass_sparse.hf on tiny random Marian / M2M100 / mBART models (no hub): masked forward and
generate() equal a dense W ⊙ M copy, Trainer steps keep off-mask weights bit-identical,
save/load round trips, plain transformers loads the weights, and the recipe end to end."""

import copy
import json
import os

import pytest
import torch

pytest.importorskip("transformers", reason="the [hf] extra (transformers) is not installed")
pytest.importorskip("accelerate", reason="the [hf] extra (accelerate, for Trainer) is missing")
pytest.importorskip("tokenizers", reason="the [hf] extra (tokenizers) is not installed")

import transformers  # noqa: E402

import lass_sparse as ls  # noqa: E402
from lass_sparse.hf import (  # noqa: E402
    LangFormat,
    LaSSConfig,
    LaSSTrainer,
    PairDataset,
    from_pretrained,
    get_lass_model,
    translate,
)
from lass_sparse.hf import pipeline as P  # noqa: E402
from lass_sparse.hf.toy import make_toy_model  # noqa: E402
from lass_sparse.mt.corpus import load_corpus  # noqa: E402
from lass_sparse.optim import MaskedAdamW  # noqa: E402

ARCHS = ["marian", "m2m100", "mbart"]
PAIRS = ["en-de", "en-fr", "de-en", "fr-en"]
TEXTS = ["Open the file", "Save the document before you close the window", "Print", "Yes"]


@pytest.fixture(scope="module")
def corpus():
    return load_corpus("demo", ["en-de", "en-fr"], max_train=64)


@pytest.fixture(scope="module", params=ARCHS)
def toy(request, tmp_path_factory):
    """(arch, folder, base model, tokenizer, LangFormat) of a tiny random model."""
    d = str(tmp_path_factory.mktemp(request.param))
    make_toy_model(d, request.param, max_train=150, vocab_size=300, d_model=16, init_std=0.5)
    model, tok = P.load(d)
    return request.param, d, model.eval(), tok, LangFormat.for_model(model, tok)


def _perturbed(model, seed, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    out = copy.deepcopy(model)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return out


def _lass(base, alpha=0.5, **cfg):
    """A LaSS copy of ``base`` with a mask per pair of PAIRS from perturbed 'fine-tunes'."""
    model = get_lass_model(copy.deepcopy(base), LaSSConfig(alpha=alpha, **cfg))
    for i, p in enumerate(PAIRS):
        model.add_pair(p, _perturbed(base, i))
    return model.eval()


def _dense(base, bank, pair):
    """Independent oracle: a copy of the plain model with each masked weight set to W ⊙ M."""
    out = copy.deepcopy(base)
    with torch.no_grad():
        for n in bank.names:
            w = out.get_parameter(n)
            w.mul_(ls.unpack_mask(bank.bits(pair, n), w.shape[-1]).to(w.dtype))
    return out.eval()


def _inputs(tok, fmt, direction, texts=TEXTS):
    src = torch.nn.utils.rnn.pad_sequence(
        [torch.tensor(x) for x in fmt.source_ids(tok, texts, direction)], batch_first=True,
        padding_value=tok.pad_token_id)
    return {"input_ids": src, "attention_mask": src.ne(tok.pad_token_id).long()}


def _prompt(model, tok, fmt, directions):
    """Per-row decoder prompt [start, target-language token] ('prefix' formats), else None."""
    if fmt.style != "prefix":
        return {}
    start = model.generation_config.decoder_start_token_id
    return {"decoder_input_ids": torch.tensor(
        [[start, fmt.token_id(tok, d.split("-")[1])] for d in directions])}


GEN = {"num_beams": 3, "max_new_tokens": 8, "do_sample": False}


# ------------------------------------------------------------------- per architecture


def test_masked_forward_equals_dense_w_times_m(toy):
    arch, _, base, tok, fmt = toy
    model = _lass(base)
    assert isinstance(model, type(base)) and type(model).__name__ == type(base).__name__
    assert not any("lm_head" in n or "embed" in n for n in model.lass_bank.names)
    x = _inputs(tok, fmt, "en-de")
    dec = torch.randint(4, 50, (len(TEXTS), 5))
    with torch.no_grad():
        dense_out = base(**x, decoder_input_ids=dec).logits
        torch.testing.assert_close(model(**x, decoder_input_ids=dec).logits, dense_out)
        for pair in ("en-de", "fr-en"):
            with model.use_pair(pair):
                y = model(**x, decoder_input_ids=dec).logits
            ref = _dense(base, model.lass_bank, pair)(**x, decoder_input_ids=dec).logits
            torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
            assert not torch.allclose(y, dense_out)
        model.set_pair("en-fr")
        assert model.active_pair == "en-fr"
        ref = _dense(base, model.lass_bank, "en-fr")(**x, decoder_input_ids=dec).logits
        torch.testing.assert_close(model(**x, decoder_input_ids=dec).logits, ref, rtol=1e-5,
                                   atol=1e-5)
        model.set_pair(None)
        torch.testing.assert_close(model(**x, decoder_input_ids=dec).logits, dense_out)


def test_generate_equals_dense_copy_and_mixed_batch(toy):
    arch, _, base, tok, fmt = toy
    model = _lass(base)
    x = _inputs(tok, fmt, "en-de")
    single = {}
    for pair in ("en-de", "en-fr"):
        kw = {**x, **GEN, **_prompt(model, tok, fmt, [pair] * len(TEXTS))}
        got = model.generate(**kw, pair=pair)
        want = _dense(base, model.lass_bank, pair).generate(**kw)
        assert torch.equal(got, want), (arch, pair)
        assert torch.equal(model.merge_and_unload(pair).generate(**kw), want)
        single[pair] = got
    k = 2 if fmt.style == "prefix" else 1  # the outputs depend on the mask (test precondition)
    assert any(not torch.equal(single["en-de"][i, k:], single["en-fr"][i, k:]) for i in range(4))
    # one pair per row: rows 0, 2 en-de and 1, 3 en-fr, beam search expands rows to batch*beams
    rows = ["en-de", "en-fr", "en-de", "en-fr"]
    mixed = model.generate(**x, **GEN, **_prompt(model, tok, fmt, rows), pair=rows)
    for i, p in enumerate(rows):
        want = single[p][i]
        n = min(len(want), mixed.shape[1])
        assert torch.equal(mixed[i, :n], want[:n]), (arch, i)
        assert (mixed[i, n:] == tok.pad_token_id).all() and (want[n:] == tok.pad_token_id).all()
    assert model.active_pair is None  # generate restored the context
    with pytest.raises(ValueError, match="pair lists 3 pairs"):
        model.generate(**x, **GEN, pair=rows[:3])


def test_trainer_steps_leave_off_mask_weights_bit_identical(toy, corpus, tmp_path):
    arch, _, base, tok, fmt = toy
    model = _lass(base)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ds = PairDataset.from_corpus(corpus, ["en-de"], tok, fmt, max_len=24)
    args = P.training_args(str(tmp_path), 3, batch_size=8, lr=1e-2)
    trainer = LaSSTrainer(model=model, args=args, train_dataset=ds)
    trainer.train()
    assert isinstance(trainer.optimizer.optimizer, MaskedAdamW)
    for n in model.lass_bank.names:
        p = model.get_parameter(n).detach()
        keep = ls.unpack_mask(model.lass_bank.bits("en-de", n), p.shape[-1]).bool()
        assert torch.equal(p[~keep], before[n][~keep]), n  # bit-identical off the mask
        assert not torch.equal(p[keep], before[n][keep]), n
        st = trainer.optimizer.optimizer.state[model.get_parameter(n)]
        assert not st["exp_avg"][~keep].any(), n
    shared = "model.shared.weight"  # unmasked parameters train densely
    assert not torch.equal(model.get_parameter(shared), before[shared])


def test_save_load_round_trip_and_plain_transformers(toy, tmp_path):
    arch, _, base, tok, fmt = toy
    model = _lass(base)
    with torch.no_grad():  # weights that differ from the base: the folder must carry them
        for n, p in model.named_parameters():
            if "embed_positions" not in n:  # Marian's sinusoidal positions are rebuilt on load
                p.mul_(1.01)
    out = str(tmp_path / "lass")
    model.save_pretrained(out)
    files = set(os.listdir(out))
    assert {"lass_masks.safetensors", "lass_config.json", "config.json"} <= files
    assert json.load(open(os.path.join(out, "lass_config.json")))["pairs"] == PAIRS
    x = _inputs(tok, fmt, "en-de")
    kw = {**x, **GEN, **_prompt(model, tok, fmt, ["en-fr"] * len(TEXTS))}
    want = model.generate(**kw, pair="en-fr")
    for loaded in (from_pretrained(None, out), from_pretrained(type(base), out),
                   from_pretrained(copy.deepcopy(base), out)):
        assert loaded.lass_bank.equal(model.lass_bank)
        assert torch.equal(loaded.generate(**kw, pair="en-fr"), want)
    plain = transformers.AutoModelForSeq2SeqLM.from_pretrained(out)
    assert type(plain) is type(base).__mro__[0] and not hasattr(plain, "lass_bank")
    ref = model.state_dict()
    assert set(plain.state_dict()) == set(ref)
    for k, v in plain.state_dict().items():
        assert torch.equal(v, ref[k]), k
    with pytest.raises(FileNotFoundError, match="lass_config.json"):
        from_pretrained(None, str(tmp_path))


# ------------------------------------------------------------------ once (Marian)


@pytest.fixture(scope="module")
def marian(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("marian1"))
    make_toy_model(d, "marian", max_train=150, vocab_size=300, d_model=16, init_std=0.5)
    model, tok = P.load(d)
    return d, model.eval(), tok, LangFormat.for_model(model, tok)


def test_zero_shot_uses_merged_encoder_and_decoder_masks(marian):
    _, base, tok, fmt = marian
    model = _lass(base)
    x = _inputs(tok, fmt, "de-fr")
    got = model.generate(**x, **GEN, pair="de-fr")  # no de-fr mask: de-en enc + en-fr dec
    bank = model.lass_bank
    for n in bank.names:
        src = "de-en" if n.startswith("model.encoder.") else "en-fr"
        assert torch.equal(bank.bits("de-fr", n), bank.bits(src, n)), n
    assert torch.equal(got, _dense(base, bank, "de-fr").generate(**x, **GEN))
    with pytest.raises(KeyError, match="zero-shot"):
        model.set_pair("de-ru")


def test_evaluate_reports_the_pipeline_metrics_and_the_paired_bootstrap(marian, corpus,
                                                                        tmp_path):
    from lass_sparse.mt.metrics import (
        bleu_chrf,
        paired_bootstrap,
        pooled_bootstrap,
        translation_accuracy,
    )

    d, base, tok, fmt = marian
    lass = _lass(base)
    dirs, kw = ["en-de", "fr-en"], dict(limit=4, num_beams=1, max_new_tokens=6)
    hyps: dict = {}
    res = P.evaluate((lass, tok), corpus, dirs, hyps_out=hyps, **kw)
    assert set(res) == {*dirs, "mean"} and set(hyps) == set(dirs)
    for dr in dirs:  # the mt/ metrics of the same outputs, as the pipeline reports them
        h, refs = hyps[dr]
        assert refs == corpus.eval_set("test", dr, 4)[1]
        tgt = dr.split("-")[1]
        assert res[dr] == {**bleu_chrf(h, refs, tgt), "acc": translation_accuracy(h, tgt),
                           "n": 4}
        assert "nc:6" in res[dr]["chrf_signature"] and "nrefs:1" in res[dr]["bleu_signature"]
    for m in ("bleu", "chrf", "acc"):
        assert res["mean"][m] == pytest.approx(sum(res[dr][m] for dr in dirs) / 2)
    cmp = P.compare({"base": (base, tok), "lass": (lass, tok), "again": (base, tok)}, corpus,
                    dirs, baseline="base", n_samples=30, seed=3, **kw)
    assert set(cmp["scores"]) == {"base", "lass", "again"}
    assert cmp["scores"]["lass"] == res
    sig = cmp["significance"]
    assert set(sig) == {"lass", "again"}
    base_hyps: dict = {}
    P.evaluate((base, tok), corpus, dirs, hyps_out=base_hyps, **kw)
    base_h = {dr: h for dr, (h, _) in base_hyps.items()}
    for dr in dirs:
        tgt = dr.split("-")[1]
        want = paired_bootstrap(base_h[dr], hyps[dr][0], hyps[dr][1], tgt, n_samples=30, seed=3)
        assert sig["lass"]["directions"][dr] == want
        assert sig["again"]["directions"][dr]["bleu"]["p_value"] == 1.0  # identical outputs
    assert sig["lass"]["pooled"] == pooled_bootstrap(
        {dr: (base_h[dr], hyps[dr][0], hyps[dr][1], dr.split("-")[1]) for dr in dirs},
        n_samples=30, seed=3)
    with pytest.raises(KeyError, match="baseline 'dense'"):
        P.compare({"base": (base, tok)}, corpus, dirs, baseline="dense")
    # the CLI: scores and the bootstrap against --baseline
    import argparse

    from lass_sparse.hf.commands import add_commands

    lass_dir = str(tmp_path / "lass")
    lass.save_pretrained(lass_dir)
    tok.save_pretrained(lass_dir)
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers())
    out = str(tmp_path / "eval.json")
    args = parser.parse_args(["hf", "evaluate", "--hf-model", lass_dir, "--baseline", d,
                              "--pairs", "en-de", "--limit", "3", "--beam", "1",
                              "--bootstrap", "20", "--json", out])
    assert args.func(args) == 0
    with open(out) as f:
        got = json.load(f)
    assert set(got["scores"]) == {"baseline", "model"}
    assert {"bleu", "chrf", "acc"} <= set(got["scores"]["model"]["en-de"])
    assert set(got["significance"]["model"]) == {"directions", "pooled"}


def test_mask_tied_output_head(marian):
    _, base, tok, fmt = marian
    model = _lass(base, mask_tied_output=True)
    assert "lm_head.weight" in model.lass_bank.names
    assert model.lm_head.weight is model.model.shared.weight
    x = _inputs(tok, fmt, "en-de")
    dec = torch.randint(4, 50, (len(TEXTS), 5))
    with torch.no_grad(), model.use_pair("en-de"):
        y = model(**x, decoder_input_ids=dec).logits
    dense = model.merge_and_unload("en-de")  # untied: head E ⊙ M, lookup E
    assert dense.lm_head.weight is not dense.model.shared.weight
    assert torch.equal(dense.model.shared.weight, base.model.shared.weight)
    keep = ls.unpack_mask(model.lass_bank.bits("en-de", "lm_head.weight"), 16).bool()
    assert torch.equal(dense.lm_head.weight, base.model.shared.weight * keep)
    with torch.no_grad():
        torch.testing.assert_close(dense(**x, decoder_input_ids=dec).logits, y, rtol=1e-5,
                                   atol=1e-5)
    opt = MaskedAdamW(model.parameters()).bind(model, model.lass_bank)
    assert "lm_head.weight" not in opt._names.values()  # the shared matrix trains densely


def test_gradient_accumulation_over_pairs_updates_the_union(marian, corpus, tmp_path):
    _, base, tok, fmt = marian
    model = _lass(base)
    ds = PairDataset.from_corpus(corpus, ["en-de", "en-fr"], tok, fmt, max_len=24)
    seen, stepped = [], []

    class Spy(LaSSTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            seen.append(inputs["lass_pair"])
            return super().training_step(model, inputs, num_items_in_batch)

    args = P.training_args(str(tmp_path), 4, batch_size=4, lr=1e-2, grad_accum=2, seed=3)
    trainer = Spy(model=model, args=args, train_dataset=ds, temperature=1.0)
    real_step = MaskedAdamW.step

    def step(self, closure=None):
        stepped.append(sorted(self.pending_pairs))
        return real_step(self, closure)

    MaskedAdamW.step = step
    try:
        trainer.train()
    finally:
        MaskedAdamW.step = real_step
    assert len(seen) == 8 and len(stepped) == 4
    assert stepped == [sorted(set(seen[i:i + 2])) for i in range(0, 8, 2)]
    assert any(len(s) == 2 for s in stepped)  # some step accumulated both pairs


def test_trainer_rejects_a_plain_optimizer(marian, corpus, tmp_path):
    _, base, tok, fmt = marian
    model = _lass(base)
    ds = PairDataset.from_corpus(corpus, ["en-de"], tok, fmt, max_len=24)
    opt = torch.optim.AdamW(model.parameters())
    with pytest.raises(TypeError, match="MaskedAdamW"):
        LaSSTrainer(model=model, args=P.training_args(str(tmp_path), 1),
                    train_dataset=ds, optimizers=(opt, None))


def test_lang_format_errors(marian):
    _, base, tok, fmt = marian
    with pytest.raises(KeyError, match=">>ru<<"):
        fmt.source_ids(tok, ["x"], "en-ru")
    t5 = transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=32, d_model=8, d_kv=4, d_ff=8, num_layers=1, num_heads=2))
    with pytest.raises(NotImplementedError, match="model_type 't5'"):
        LangFormat.for_model(t5, tok)
    with pytest.raises(ValueError, match="alpha"):
        LaSSConfig(alpha=1.0)


def test_recipe_end_to_end_and_cli(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "hf_lass", os.path.join(os.path.dirname(__file__), "..", "..", "examples", "hf_lass.py"))
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    out = str(tmp_path / "run")
    res = recipe.main(["--toy", "m2m100", "--pairs", "en-de", "de-en", "--out", out,
                       "--ft-steps", "2", "--joint-steps", "3", "--batch-size", "4",
                       "--max-train", "60", "--eval-limit", "3", "--beam", "1",
                       "--bootstrap", "20"])
    assert set(res) == {"scores", "significance"}
    assert set(res["scores"]) == {"base", "lass"}
    assert set(res["scores"]["lass"]) == {"en-de", "de-en", "mean"}
    assert {"bleu", "chrf", "acc", "n"} <= set(res["scores"]["lass"]["en-de"])
    assert set(res["significance"]["lass"]["directions"]) == {"en-de", "de-en"}
    assert 0 < res["significance"]["lass"]["pooled"]["bleu"]["p_value"] <= 1
    with open(os.path.join(out, "results.json")) as f:
        assert json.load(f)["scores"]["base"]["mean"] == res["scores"]["base"]["mean"]
    base, _ = P.load(os.path.join(out, "base"))
    joint, tok = P.load(os.path.join(out, "joint"))
    assert joint.pairs == ["en-de", "de-en"]
    union = joint.lass_bank.union(["en-de", "de-en"])
    changed = 0
    for n, bits in union.items():  # joint training moved nothing outside the masks
        w, w0 = joint.get_parameter(n), base.get_parameter(n)
        keep = ls.unpack_mask(bits, w.shape[-1]).bool()
        assert torch.equal(w[~keep], w0[~keep]), n
        changed += int((w[keep] != w0[keep]).sum())
    assert changed > 0
    # the CLI stages on the same folders
    import argparse

    from lass_sparse.hf.commands import add_commands

    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers())
    cli_out = str(tmp_path / "cli")
    args = parser.parse_args(["hf", "prune", "--hf-model", os.path.join(out, "base"),
                              "--finetuned", os.path.join(out, "finetune"), "--pairs", "en-de",
                              "--alpha", "0.3", "--out", cli_out])
    assert args.func(args) == 0
    pruned, _ = P.load(cli_out)
    assert pruned.pairs == ["en-de"] and pruned.lass_config.alpha == 0.3
    mixed = translate(joint, tok, ["Open the file", "Datei öffnen"], ["en-de", "de-en"],
                      num_beams=2, max_new_tokens=5)
    assert len(mixed) == 2
