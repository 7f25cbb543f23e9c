"""The released LaSS recipe: language tags, masked tied output projection, early stopping on
validation loss, token batches, extension from θ0, shared-mask control, external test sets."""

from __future__ import annotations

import copy
import gzip
import json
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("sentencepiece")
pytest.importorskip("sacrebleu")

import lass_sparse as ls  # noqa: E402
from lass_sparse.distributed import PairGroupedSampler  # noqa: E402
from lass_sparse.lass import pipeline as P  # noqa: E402
from lass_sparse.lass import train as T  # noqa: E402
from lass_sparse.lass.model import ModelConfig, Seq2Seq, label_smoothed_loss  # noqa: E402
from lass_sparse.optim import MaskedAdamW  # noqa: E402

SMALL = dict(d_model=32, heads=2, ffn=64, enc_layers=1, dec_layers=1, dropout=0.0)
KW = dict(batch_size=16, progress=False, ckpt_every=50)
OUT = "decoder.output_projection.weight"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("recipe"))
    r = P.prepare(d, "demo", "tiny", vocab_size=400, pairs=["en-de", "en-fr"], max_train=120,
                  **SMALL)
    P.train(r, 4, out="base", **KW)
    return r


# ----------------------------------------------------------------------------- language tags

def test_new_runs_default_to_source_tag_and_masked_output(run):
    info = json.load(open(run.path("run.json")))
    assert info["langtok"] == "src" and info["model"]["mask_output_proj"] is True
    assert run.langtok == "src"
    enc = run.encoded(["de-en"])
    first = {s[0] for s in enc.src}
    assert first == {run.tok.lang_id("de")}  # source language on the encoder
    assert {t[0] for t in enc.tgt} == {run.tok.lang_id("en")}  # target language starts decoding


def test_old_runs_without_the_field_keep_the_target_tag(run, tmp_path):
    info = json.load(open(run.path("run.json")))
    del info["langtok"]
    del info["model"]["mask_output_proj"]
    (tmp_path / "run.json").write_text(json.dumps(info))
    (tmp_path / "spm.model").write_bytes(open(run.path("spm.model"), "rb").read())
    old = P.open_run(str(tmp_path))
    assert old.langtok == "tgt" and old.model_config.mask_output_proj is False
    assert {s[0] for s in old.encoded(["de-en"]).src} == {old.tok.lang_id("en")}
    assert not hasattr(old.new_model().decoder, "output_projection")


@pytest.mark.parametrize("langtok", ["src", "tgt"])
def test_translate_feeds_the_encoder_the_run_tag(run, monkeypatch, langtok):
    import lass_sparse.lass.translate as tr

    seen = []

    def spy(model, src, bos, beam, **kw):
        seen.append((src[:, 0].unique().tolist(), bos))
        return [[] for _ in range(src.shape[0])]

    monkeypatch.setattr(tr, "beam_search", spy)
    model = run.load_model("base")
    tr.translate(model, run.tok, ["Open the file", "Save"], "fr-de", langtok=langtok)
    want = run.tok.lang_id("fr" if langtok == "src" else "de")
    assert seen == [([want], run.tok.lang_id("de"))]
    with pytest.raises(ValueError, match="langtok"):
        tr.translate(model, run.tok, ["x"], "fr-de", langtok="both")


def test_cli_refuses_to_change_fixed_run_options(run, capsys):
    from lass_sparse.cli import main

    assert main(["train", "--run", run.dir, "--langtok", "tgt", "--steps", "1", "--quiet"]) == 1
    assert "was created with --langtok src" in capsys.readouterr().err
    assert main(["train", "--run", run.dir, "--no-mask-output-proj", "--steps", "1",
                 "--quiet"]) == 1
    assert "--mask-output-proj True" in capsys.readouterr().err


# ------------------------------------------------------------------- masked output projection

def _tiny_model(mask_out: bool) -> Seq2Seq:
    torch.manual_seed(0)
    return Seq2Seq(ModelConfig(vocab_size=40, **SMALL, mask_output_proj=mask_out))


def _output_only_bank(model: Seq2Seq, seed: int = 1) -> tuple[ls.MaskBank, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(model.embed.weight.shape, generator=g) < 0.5
    bank = ls.MaskBank({OUT: model.embed.weight.shape})
    bank.add_pair("a", {OUT: ls.pack_mask(mask)})
    return bank, mask


def test_masked_output_projection_is_embedding_times_mask_with_dense_lookup():
    model = _tiny_model(True)
    assert OUT in ls.nn.masked_parameters(model)
    assert OUT not in model.state_dict()  # no new key: checkpoints stay interchangeable
    bank, mask = _output_only_bank(model)
    ls.attach(model, bank)
    src, tgt = torch.randint(4, 40, (3, 6)), torch.randint(4, 40, (3, 5))
    hidden = {}
    model.decoder.norm.register_forward_hook(lambda m, i, o: hidden.setdefault("h", o))
    with ls.active_pair(model, "a"):
        logits = model(src, tgt)
    ref = F.linear(hidden["h"], model.embed.weight * mask)
    torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)
    dense = model(src, tgt)  # no pair active: the plain tied projection
    assert not torch.allclose(dense, logits)

    # gradient: the masked head's part is masked, the lookup's part is dense
    target = torch.randint(4, 40, (3, 5))
    with ls.active_pair(model, "a"):
        label_smoothed_loss(model(src, tgt), target).backward()
    ours = model.embed.weight.grad.clone()

    ref_model = _tiny_model(False)
    ref_model.load_state_dict(model.state_dict())
    E = ref_model.embed.weight
    h = {}
    ref_model.decoder.norm.register_forward_hook(lambda m, i, o: h.setdefault("h", o))

    def loss_with(out_weight):
        h.clear()
        ref_model.zero_grad()
        memory, pad = ref_model.encode(src)
        x = ref_model._embed(tgt, ref_model.dec_pos)
        for layer in ref_model.decoder.layers:
            x = layer(x, memory, pad)
        label_smoothed_loss(F.linear(ref_model.decoder.norm(x), out_weight), target).backward()
        return E.grad.clone()

    full = loss_with(E * mask)
    torch.testing.assert_close(ours, full, rtol=1e-5, atol=1e-6)
    lookup_only = loss_with(E.detach() * mask)
    off = ~mask
    torch.testing.assert_close(ours[off], lookup_only[off], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(ours[mask], lookup_only[mask])


def test_masked_adamw_trains_the_whole_tied_embedding():
    model = _tiny_model(True)
    bank, mask = _output_only_bank(model)
    ls.attach(model, bank)
    opt = MaskedAdamW(model.parameters(), lr=1e-2).bind(model, bank)
    before = model.embed.weight.detach().clone()
    src, tgt = torch.randint(4, 40, (3, 6)), torch.randint(4, 40, (3, 5))
    with ls.active_pair(model, "a"):
        model(src, tgt).square().mean().backward()
    opt.note_pair("a")
    opt.step()
    moved = model.embed.weight.detach() != before
    assert moved[~mask].any()  # off-mask entries train too (the lookup uses them unmasked)
    assert opt._names == {} or id(model.embed.weight) not in opt._names


class _TiedLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(30, 8)
        self.body = nn.Linear(8, 8)
        self.lm_head = nn.Linear(8, 30, bias=False)
        self.lm_head.weight = self.embed.weight

    def forward(self, ids):
        return self.lm_head(torch.tanh(self.body(self.embed(ids))))


def test_convert_mask_tied_output_option():
    plain = _TiedLM()
    assert ls.convert(copy.deepcopy(plain)) == ["body.weight"]  # default unchanged
    model = copy.deepcopy(plain)
    names = ls.convert(model, mask_tied_output=True)
    assert names == ["body.weight", "lm_head.weight"]
    assert model.lm_head.weight is model.embed.weight
    bank = ls.MaskBank.from_model(model, 0.5, names, pair="a")
    ls.attach(model, bank)
    ids = torch.randint(0, 30, (2, 5))
    m = ls.unpack_mask(bank.bits("a", "lm_head.weight"), 8)
    mb = ls.unpack_mask(bank.bits("a", "body.weight"), 8)
    with ls.active_pair(model, "a"):
        y = model(ids)
    h = torch.tanh(F.linear(model.embed(ids), model.body.weight * mb, model.body.bias))
    torch.testing.assert_close(y, F.linear(h, model.embed.weight * m), rtol=1e-5, atol=1e-5)
    opt = MaskedAdamW(model.parameters(), lr=1e-2).bind(model, bank)
    assert list(opt._names.values()) == ["body.weight"]  # the shared matrix trains densely
    assert ls.convert(_TiedLM(), mask_tied_output=True, exclude=["lm_head"]) == ["body.weight"]


# ------------------------------------------------------------------------- early stopping

def test_early_stopping_on_a_scripted_validation_curve(run, monkeypatch, tmp_path):
    curve = iter([5.0, 4.0, 3.0, 3.5, 3.6, 3.7, 1.0, 1.0])
    snapshots = {}

    def scripted(model, data, directions, **kw):
        step = len(snapshots) * 2 + 2
        snapshots[step] = {k: v.clone() for k, v in model.state_dict().items()}
        v = next(curve)
        return {"loss": v, "nll": v, "tokens": 1, "by_direction": {}}

    monkeypatch.setattr(T, "validation_loss", scripted)
    model = run.new_model()
    cfg = T.TrainConfig(stage="es", directions=["en-de"], steps=100, validate_every=2,
                        patience=3, batch_size=8, ckpt_every=50)
    valid = run.valid_encoded(["en-de"], 8)
    out = str(tmp_path / "es")
    res = T.run_stage(out, model, run.encoded(["en-de"]), cfg, valid=valid, progress=False)
    # validations at 2, 4, 6 (best, 3.0), then 8, 10, 12 without improvement: stop at 12
    assert res["steps"] == 12 and res["stopped_early"] and res["best_step"] == 6
    assert res["best_valid_loss"] == 3.0
    best = Seq2Seq(run.model_config)
    from lass_sparse.lass.checkpoint import load_checkpoint

    load_checkpoint(os.path.join(out, "best"), best)
    for k, v in best.state_dict().items():
        assert torch.equal(v, snapshots[6][k]), k
    assert not all(torch.equal(v, snapshots[12][k]) for k, v in best.state_dict().items())
    recs = [json.loads(x) for x in open(os.path.join(out, "log.jsonl"))]
    assert [r["step"] for r in recs if "valid_loss" in r] == [2, 4, 6, 8, 10, 12]
    # rerun: already stopped, nothing more is trained
    again = T.run_stage(out, run.new_model(), run.encoded(["en-de"]), cfg, valid=valid,
                        progress=False)
    assert again["steps"] == 12 and again["stopped_early"] and len(snapshots) == 6


def test_later_stages_start_from_the_best_checkpoint(run):
    P.train(run, 6, out="base-es", validate_every=2, valid_limit=8, **KW)
    best = run.checkpoint("base-es")
    assert best.endswith(os.path.join("base-es", "best"))
    from lass_sparse.lass.checkpoint import read_state

    best_step = read_state(best)["step"]
    m = run.load_model("base-es")
    ref = Seq2Seq(run.model_config)
    from lass_sparse.lass.checkpoint import load_checkpoint

    load_checkpoint(best, ref)
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(),
                                                  ref.state_dict().values()))
    assert run.checkpoint("base-es", "last").endswith(os.path.join("base-es", "ckpt"))
    assert 2 <= best_step <= 6


def test_validation_loss_uses_each_directions_mask(run):
    model = run.load_model("base")
    bank = ls.MaskBank.from_model(model, 0.6, pair="en-de")
    bank.add_pair("de-en", bank.masks_from_model(model))
    valid = run.valid_encoded(["en-de"], 8)
    ls.attach(model, bank)
    masked = T.validation_loss(model, valid, ["en-de"], bank=bank, label_smoothing=0.0)
    dense = T.validation_loss(model, valid, ["en-de"], label_smoothing=0.0)
    b = valid.batch("en-de", list(valid.index["en-de"]))
    model.eval()
    with torch.no_grad(), ls.active_pair(model, "en-de"):
        want = float(label_smoothed_loss(model(b.src, b.tgt_in), b.tgt_out, 0.0))
    assert masked["nll"] == pytest.approx(want, rel=1e-5)
    assert masked["nll"] != pytest.approx(dense["nll"], rel=1e-3)
    model.train()
    T.validation_loss(model, valid, ["en-de"])
    assert model.training


# ---------------------------------------------------------------------------- token batches

def test_token_batches_respect_the_budget_and_cover_each_pair():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(3, 40, (300,), generator=g).tolist()
    lengths[7] = 500  # longer than the budget: a batch of its own
    pairs = {"a": range(0, 200), "b": range(200, 300)}
    s = PairGroupedSampler(pairs, batch_size=10_000, max_tokens=256, lengths=lengths,
                           temperature=1.0, num_replicas=1, rank=0)
    seen = {"a": set(), "b": set()}
    for pair, idx in s.batches():
        assert all(i in pairs[pair] for i in idx)
        longest = max(lengths[i] for i in idx)
        assert len(idx) * longest <= 256 or len(idx) == 1
        seen[pair].update(idx)
    assert len(s) == sum(1 for _ in s.batches())
    assert len(seen["a"]) > 150 and len(seen["b"]) > 60  # most examples once per epoch
    rows = PairGroupedSampler(pairs, batch_size=4, max_tokens=10_000, lengths=lengths,
                              num_replicas=1, rank=0)
    assert max(len(i) for _, i in rows.batches()) == 4  # batch_size caps the rows
    with pytest.raises(ValueError, match="lengths"):
        PairGroupedSampler(pairs, 8, max_tokens=100)


def test_training_with_token_batches(run):
    res = P.train(run, 3, out="tok", max_tokens=300, batch_size=300, progress=False,
                  ckpt_every=50)
    assert res["steps"] == 3 and res["tokens"] > 0


# --------------------------------------------------------------------- extension and controls

def test_extend_finetunes_from_theta0_by_default(run, monkeypatch):
    P.finetune(run, "en-de", 2, **KW)
    P.finetune(run, "de-en", 2, **KW)
    P.prune(run, 0.5, directions=["en-de", "de-en"], out="masks-de.safetensors")
    P.joint(run, "masks-de.safetensors", 2, out="joint-de", **KW)
    calls = []
    real = P.finetune

    def spy(run_, d, steps, *, init, out=None, **kw):
        calls.append(init)
        return real(run_, d, steps, init=init, out=out, **kw)

    monkeypatch.setattr(P, "finetune", spy)
    P.extend(run, "en-fr", masks="masks-de.safetensors", init="joint-de", ft_steps=1, steps=1,
             out="ext-a", **KW)
    P.extend(run, "fr-en", masks="masks-de.safetensors", init="joint-de", ft_init="joint-de",
             ft_steps=1, steps=1, out="ext-b", **KW)
    assert calls == ["base", "joint-de"]


def test_shared_mask_control_is_theta0s_own_mask_for_every_direction(run):
    P.finetune(run, "en-de", 2, **KW)
    P.finetune(run, "de-en", 2, **KW)
    bank = P.prune(run, 0.5, directions=["en-de", "de-en"], out="masks-shared.safetensors",
                   shared_from="base")
    own = bank.masks_from_model(run.load_model("base"))
    for d in ("en-de", "de-en"):
        for n in bank.names:
            assert torch.equal(bank.bits(d, n), own[n]), n
    assert bank.similarity("en-de", "de-en") == 1.0


# ------------------------------------------------------------------------ external test sets

def test_external_test_file_equals_the_corpus_rows(run, tmp_path):
    from lass_sparse.cli import main

    rows = run.corpus.test[:6]
    langs = list(rows[0])
    path = tmp_path / "mine.tsv.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("\t".join(langs) + "\n")
        for r in rows:
            f.write("\t".join(r[lang] for lang in langs) + "\n")
    systems = {"theta0": ("base", None)}
    via_corpus = P.evaluate(run, systems, ["en-de", "fr-en"], limit=6, beam=1, progress=False)
    out = str(tmp_path / "ev")
    assert main(["evaluate", "--run", run.dir, "--system", "theta0=base", "--test", str(path),
                 "--directions", "en-de", "fr-en", "--beam", "1", "--quiet",
                 "--out", out]) == 0
    via_file = json.load(open(out + ".json"))
    assert via_file["test"] == str(path)
    for d in ("en-de", "fr-en"):
        for k in ("bleu", "chrf", "acc", "n"):
            assert via_file["results"]["theta0"][d][k] == pytest.approx(
                via_corpus["theta0"][d][k]), (d, k)


def test_evaluate_bootstrap_against_the_baseline(run, tmp_path):
    from lass_sparse.cli import main

    P.train(run, 2, out="more", init="base", **KW)
    out = str(tmp_path / "sig")
    assert main(["evaluate", "--run", run.dir, "--system", "theta0=base", "--baseline", "more",
                 "--directions", "en-de", "de-en", "--limit", "8", "--beam", "1",
                 "--bootstrap", "50", "--quiet", "--out", out]) == 0
    rep = json.load(open(out + ".json"))
    sig = rep["significance"]["theta0"]
    assert set(sig["directions"]) == {"en-de", "de-en"}
    for t in [*sig["directions"].values(), sig["pooled"]]:
        assert 0.0 <= t["bleu"]["p_value"] <= 1.0
    assert "Paired bootstrap" in open(out + ".md").read()


def test_heatmap_colour_scale_spans_the_off_diagonal_values():
    from lass_sparse.lass.plots import color_range

    m = [[1.0, 0.91, 0.95], [0.92, 1.0, 0.93], [0.96, 0.94, 1.0]]
    assert color_range(m) == (0.91, 0.96)
    assert color_range([[1.0]]) == (0.0, 1.0)
