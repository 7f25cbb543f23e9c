"""The pipeline's ``--device`` / ``--amp``: resolution and errors on any machine; the whole
pipeline on a GPU (``gpu`` marker), its checkpoints loading on the CPU."""

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
from lass_sparse.lass.device import model_device, resolve_amp, resolve_device  # noqa: E402

SMALL = dict(d_model=32, heads=2, ffn=64, enc_layers=1, dec_layers=2, dropout=0.1)
KW = dict(batch_size=16, progress=False, ckpt_every=2)
HAS_CUDA = torch.cuda.is_available()


def test_auto_is_cuda_exactly_when_torch_sees_a_gpu():
    assert resolve_device("auto") == torch.device("cuda" if HAS_CUDA else "cpu")
    assert resolve_device(None) == resolve_device("auto")
    assert resolve_device("CPU") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")


@pytest.mark.parametrize("spec,msg", [("tpu", "expected auto"), ("cuda:banana", "expected auto"),
                                      ("mps", "expected auto"), ("cuda:99", "cuda")])
def test_bad_devices_name_the_option(spec, msg):
    with pytest.raises(ValueError, match="--device") as e:
        resolve_device(spec)
    assert msg in str(e.value)


@pytest.mark.skipif(HAS_CUDA, reason="checks the message on a machine without a GPU")
def test_cuda_without_a_gpu_says_so_and_suggests_cpu():
    with pytest.raises(ValueError, match="sees no CUDA GPU.*--device cpu"):
        resolve_device("cuda")


def test_amp_resolution():
    cpu = torch.device("cpu")
    assert resolve_amp("auto", cpu) == "none"
    assert resolve_amp("bf16", cpu) == "bf16"
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        resolve_amp("fp16", cpu)
    with pytest.raises(ValueError, match="--amp"):
        resolve_amp("int8", cpu)
    if HAS_CUDA:
        want = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        assert resolve_amp("auto", torch.device("cuda")) == want


@pytest.mark.skipif(HAS_CUDA, reason="the error is for machines without a GPU")
def test_cli_device_error_is_one_line(tmp_path, capsys):
    rc = main(["train", "--run", str(tmp_path / "r"), "--steps", "1", "--device", "cuda",
               "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and len(err) == 1 and "--device cuda" in err[0] and "Traceback" not in err[0]
    assert not os.path.exists(tmp_path / "r" / "run.json")  # refused before any work


def test_explicit_cpu_and_auto_train_identically_on_a_cpu_machine(tmp_path):
    if HAS_CUDA:
        pytest.skip("auto is cuda here")
    out = {}
    for spec in ("cpu", "auto"):
        r = P.prepare(str(tmp_path / spec), "demo", "tiny", vocab_size=300, pairs=["en-de"],
                      max_train=80, device=spec, **SMALL)
        assert r.device == torch.device("cpu")
        P.train(r, 3, out="base", **KW)
        out[spec] = r.load_model("base").state_dict()
    for k, v in out["cpu"].items():
        assert torch.equal(v, out["auto"][k]), k


def test_stage_log_records_device_amp_and_kernels(tmp_path):
    r = P.prepare(str(tmp_path / "r"), "demo", "tiny", vocab_size=300, pairs=["en-de"],
                  max_train=80, device="cpu", **SMALL)
    P.train(r, 2, out="base", **KW)
    with open(r.path("base", "log.jsonl")) as f:
        recs = [json.loads(line) for line in f]
    start = [x for x in recs if x.get("event") == "start"]
    assert len(start) == 1 and start[0]["device"] == "cpu" and start[0]["amp"] == "none"
    assert set(start[0]["backends"]) == {n for n, s in ls.backends().items() if s["active"]}
    from lass_sparse.lass.train import plot_log

    pytest.importorskip("matplotlib")
    assert os.path.exists(plot_log(r.path("base", "log.jsonl"), str(tmp_path / "c.png")))


# ------------------------------------------------------------------------------ on a GPU


@pytest.fixture(scope="module")
def gpu_run(tmp_path_factory):
    if not HAS_CUDA:
        pytest.skip("needs a CUDA GPU")
    d = str(tmp_path_factory.mktemp("gpu_run"))
    r = P.prepare(d, "demo", "tiny", vocab_size=1000, pairs=["en-de", "en-zh"], max_train=150,
                  device="cuda", **SMALL)
    res = {"base": P.train(r, 6, out="base", amp="auto", **KW)}
    for direction in r.directions:
        P.finetune(r, direction, 3, amp="auto", **KW)
    P.prune(r, 0.5, out="masks.safetensors")
    res["joint"] = P.joint(r, "masks.safetensors", 4, out="joint", amp="auto",
                           validate_every=2, valid_limit=8, **KW)
    return r, res


@pytest.mark.gpu
def test_pipeline_trains_on_the_gpu_with_masks_respected(gpu_run):
    r, res = gpu_run
    assert r.device.type == "cuda"
    for stage in ("base", "joint"):
        assert res[stage]["steps"] > 0 and torch.isfinite(torch.tensor(res[stage]["mean_loss"]))
        with open(r.path(stage, "log.jsonl")) as f:
            start = [json.loads(x) for x in f if '"start"' in x][0]
        assert start["device"].startswith("cuda") and start["amp"] in ("bf16", "fp16")
    base, joint = r.load_model("base"), r.load_model("joint", which="last")
    assert model_device(base).type == "cuda"
    bank = ls.MaskBank.load(r.path("masks.safetensors"))
    registered = dict(base.named_parameters())
    for name, bits in bank.union(bank.pairs).items():
        if name in registered:
            off = ~ls.unpack_mask(bits, bank.shapes[name][-1]).cuda()
            assert torch.equal(base.get_parameter(name)[off], joint.get_parameter(name)[off])


@pytest.mark.gpu
def test_gpu_checkpoints_load_on_the_cpu_and_translate_the_same(gpu_run):
    r, _ = gpu_run
    cpu_run = P.open_run(r.dir, "cpu")
    g, c = r.load_model("joint"), cpu_run.load_model("joint")
    assert model_device(c).type == "cpu"
    for (k, a), (_, b) in zip(g.state_dict().items(), c.state_dict().items()):
        assert torch.equal(a.cpu(), b), k
    texts = ["Hello world.", "Open the file."]
    hyp_gpu = P.translate_texts(r, "joint", "en-de", texts, masks="masks.safetensors", beam=1)
    hyp_cpu = P.translate_texts(cpu_run, "joint", "en-de", texts, masks="masks.safetensors",
                                beam=1)
    assert len(hyp_gpu) == len(hyp_cpu) == 2
    pytest.importorskip("langid")  # translation accuracy (not on every GPU image)
    res = P.evaluate(r, {"lass": ("joint", "masks.safetensors")}, ["en-de", "de-zh"],
                     limit=6, beam=2, progress=False)
    assert all(0.0 <= res["lass"][d]["bleu"] <= 100.0 for d in ("en-de", "de-zh"))


@pytest.mark.gpu
def test_fp16_autocast_with_grad_scaler_trains(tmp_path):
    if not HAS_CUDA:
        pytest.skip("needs a CUDA GPU")
    r = P.prepare(str(tmp_path / "r"), "demo", "tiny", vocab_size=300, pairs=["en-de"],
                  max_train=80, device="cuda", **SMALL)
    res = P.train(r, 4, out="base", amp="fp16", **KW)
    assert res["steps"] == 4 and torch.isfinite(torch.tensor(res["mean_loss"]))


@pytest.mark.gpu
@pytest.mark.parametrize("masked", [False, True])
def test_training_steps_on_the_gpu_do_not_sync(tmp_path, monkeypatch, masked):
    """After two warm-up steps, a CLI training step (batch to the device, bf16 forward and
    backward, clip, MaskedAdamW) runs under ``torch.cuda.set_sync_debug_mode("error")``: no
    step reads a value back (the host stays ahead of the GPU). Logging and checkpoints, outside
    the step, may."""
    if not HAS_CUDA:
        pytest.skip("needs a CUDA GPU")
    from lass_sparse.lass import train as T

    real = T._StageRun.step
    calls = []

    def strict(self):
        calls.append(self.step_no)
        if len(calls) <= 2:
            return real(self)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            return real(self)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    monkeypatch.setattr(T._StageRun, "step", strict)
    r = P.prepare(str(tmp_path / "r"), "demo", "tiny", vocab_size=300, pairs=["en-de", "en-fr"],
                  max_train=80, device="cuda", **SMALL)
    if not masked:
        res = P.train(r, 6, out="base", amp="bf16", batch_size=16, progress=False,
                      ckpt_every=100)
    else:
        P.train(r, 2, out="base", amp="bf16", **KW)
        for d in r.directions:
            P.finetune(r, d, 1, amp="bf16", **KW)
        P.prune(r, 0.5, out="masks.safetensors")
        calls.clear()
        res = P.joint(r, "masks.safetensors", 6, out="joint", amp="bf16", batch_size=16,
                      progress=False, ckpt_every=100)
    assert res["steps"] == 6 and len(calls) >= 6
