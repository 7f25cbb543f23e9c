"""The experiment driver: config checks, the bundled configs, a shortened reproduction end to end
(every report section, resume), two workers in one process group, and ``--nproc-per-node``."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("sentencepiece")
pytest.importorskip("sacrebleu")

from lass_sparse.cli import main  # noqa: E402
from lass_sparse.lass.experiment import config as C  # noqa: E402
from lass_sparse.lass.experiment.runner import plan, waves  # noqa: E402
from lass_sparse.testing import run_process_group  # noqa: E402

TINY = ["run.model_overrides.d_model=32", "run.model_overrides.heads=2",
        "run.model_overrides.ffn=64", "run.model_overrides.enc_layers=1",
        "run.model_overrides.dec_layers=1", "run.vocab_size=600", "run.max_train=80",
        "run.device='cpu'", "run.threads=1"]


def _sets(items: list[str]) -> list[str]:
    return [a for s in items for a in ("--set", s)]


def _write(tmp_path, text: str, name: str = "x.toml") -> str:
    p = tmp_path / name
    p.write_text(text)
    return str(p)


@pytest.mark.parametrize("name", ["demo", "reproduction", "reproduction-seed1", "gpu", "breadth",
                                  "breadth-extension"],
                         ids=lambda n: f"config-{n}")  # a bare "gpu" id would mark it gpu
def test_bundled_configs_load_and_plan(name):
    cfg = C.load(name)
    assert cfg.stages and cfg.report
    dirs = ["en-de", "de-en", "en-fr", "fr-en", "en-zh", "zh-en"]
    jobs = [j for wave in plan(cfg, dirs, {"alpha": 0.5}) for j in wave]
    assert all(not isinstance(j, str) for j in jobs), jobs  # every variable resolves
    ids = [j.id for j in jobs]
    assert len(ids) == len(set(ids))
    assert any(j.kind == "finetune" and j.params["direction"] == "en-de" for j in jobs)


def test_breadth_config_covers_the_issue():
    cfg = C.load("breadth")
    dirs = [d for p in ("de", "es", "fr", "it", "pt", "ru", "zh", "ar")
            for d in (f"en-{p}", f"{p}-en")]
    jobs = [j for wave in plan(cfg, dirs, {"alpha": 0.5}) for j in wave]
    fts = [j for j in jobs if j.stage == "finetune"]
    assert len(fts) == 16
    assert sorted(j.params["masks"] for j in jobs if j.stage == "joint") == [
        f"masks-a{a}.safetensors" for a in (0.3, 0.5, 0.7)]
    zero = next(j for j in jobs if j.stage == "eval-zero").params["directions"]
    assert len(zero) == 12 and not any("en" in d.split("-") for d in zero)
    assert any(j.stage == "finetune-s1" and j.params["seed"] == 1 for j in jobs)
    ext = C.load("breadth-extension")
    jobs = [j for wave in plan(ext, dirs, {}) for j in wave]
    base7 = next(j for j in jobs if j.stage == "base7").params["directions"]
    assert len(base7) == 14 and "en-ar" not in base7
    assert {j.params.get("strict", False) for j in jobs if j.kind == "extend"} == {True, False}
    assert all(j.params["directions"] == ["en-ar", "ar-en"] for j in jobs if j.kind == "extend")


def test_reproduction_plan_runs_side_by_side_what_the_old_driver_did():
    cfg = C.load("reproduction")
    by_wave = [[st["name"] for st in w] for w in waves(cfg)]
    assert ["dense", "joint-shared", "joint-random", "eval-alpha"] in by_wave
    assert ["joint", "eval-theta0", "eval-theta0-zero"] in by_wave  # θ0 scored beside training
    assert cfg.stage("base")["ddp"] and cfg.run["workers"] == 2
    # templates and [train] defaults reach the stage; the stage's own values win
    j = cfg.stage("joint")
    assert (j["lr"], j["max_tokens"], j["patience"], j["amp"]) == (5e-4, 4096, 4, "bf16")
    seed1 = C.load("reproduction-seed1")
    assert seed1.stage("joint-s1")["seed"] == 1 and seed1.run["dir"] == cfg.run["dir"]
    assert [s["name"] for s in seed1.stages][:len(cfg.stages)] == [s["name"] for s in cfg.stages]


@pytest.mark.parametrize("text,msg", [
    ("[run]\ncorpuss = 'demo'\n", "unknown key(s) corpuss"),
    ("[[stage]]\nname = 'a'\nkind = 'bake'\n", "kind must be one of"),
    ("[[stage]]\nname = 'a'\nkind = 'train'\n", "needs steps"),
    ("[[stage]]\nname = 'a'\nkind = 'train'\nsteps = 1\nafter = 'b'\n", "not an earlier stage"),
    ("[[stage]]\nname = 'a'\nkind = 'joint'\nsteps = 1\nuse = 't'\n", "no [templates.t]"),
    ("[[stage]]\nname = 'a'\nkind = 'prune'\nalpha = 0.5\nlr = 1\n", "unknown key(s) lr"),
    ("[run]\npairs = ['en_de']\n", "pairs are English-centric"),
    ("[run]\npairs = ['de-fr']\n", "pairs are English-centric"),
    ("[run]\nworkers = 0\n", "workers must be an integer >= 1"),
    ("name = [\n", "not valid TOML"),
])
def test_bad_configs_name_the_file_and_key(tmp_path, text, msg):
    path = _write(tmp_path, text)
    with pytest.raises(C.ConfigError, match=msg.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[").replace("]", r"\]")) as e:
        C.load(path)
    assert path in str(e.value) or "TOML" in str(e.value)


def test_evaluate_stage_passes_materialize(tmp_path, monkeypatch):
    """An evaluate stage's ``materialize = true`` reaches the pipeline's evaluate (default
    false)."""
    from lass_sparse.lass import pipeline as P
    from lass_sparse.lass.experiment import jobs

    seen = []

    def fake(run, systems, dirs, **kw):
        seen.append(kw["materialize"])
        kw["hyps_out"]["s"] = {d: ([], []) for d in dirs}
        return {"s": {d: {"bleu": 1.0} for d in dirs}}

    monkeypatch.setattr(P, "evaluate", fake)
    for extra, want in (({}, False), ({"materialize": True}, True)):
        p = {"systems": {"s": "joint@masks.safetensors"}, "directions": ["en-de"], **extra}
        assert jobs.evaluate(None, p, str(tmp_path / str(want)))["average_bleu"] == 1.0
        assert seen[-1] is want


def test_set_scale_extends_and_unset_variables(tmp_path):
    _write(tmp_path, "[run]\ncorpus = 'demo'\n[[stage]]\nname = 'a'\nkind = 'train'\n"
                  "steps = 100\n[[stage]]\nname = 'b'\nkind = 'prune'\nalpha = '{alpha}'\n",
                  "base.toml")
    child = _write(tmp_path, "extends = 'base.toml'\n[[stage]]\nname = 'c'\nkind = 'train'\n"
                   "steps = 10\n", "child.toml")
    cfg = C.load(child, ["stage.a.steps=40", "run.max_train=7", "train.amp='none'"], scale=0.5)
    assert [s["name"] for s in cfg.stages] == ["a", "b", "c"]
    assert cfg.stage("a")["steps"] == 20 and cfg.stage("c")["steps"] == 5
    assert cfg.run["max_train"] == 7 and cfg.stage("a")["amp"] == "none"
    items = plan(cfg, ["en-de"], {})
    assert "b (after a select stage)" in items[1]
    with pytest.raises(C.ConfigError, match=r"\{alpha\} is not set"):
        C.fill("masks-a{alpha}", {}, "stage 'b'")
    assert C.fill("{alpha}", {"alpha": 0.5}, "") == 0.5  # keeps its type
    assert C.fill({"L-{a}": "x{a}"}, {"a": 1}, "") == {"L-1": "x1"}
    with pytest.raises(C.ConfigError, match="no stage named 'zz'"):
        C.load(child, ["stage.zz.steps=1"])
    with pytest.raises(C.ConfigError, match="not found"):
        C.load(str(tmp_path / "missing.toml"))


def test_cli_errors_are_one_line(tmp_path, capsys):
    bad = _write(tmp_path, "[run]\nbogus = 1\n")
    assert main(["experiment", "run", bad]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown key(s) bogus" in err[0]
    assert main(["experiment", "run", "reproduction", "--set", "run.corpus='/nonexistent'",
                 "--set", "run.workers=1"]) == 1
    assert "does not exist" in capsys.readouterr().err


@pytest.fixture(scope="module")
def shortened(tmp_path_factory):
    """The reproduction with its second seed on the demo corpus at toy size, one worker."""
    d = tmp_path_factory.mktemp("experiment")
    run_dir, out = str(d / "run"), str(d / "results")
    sets = TINY + [
        "run.corpus='demo'", "run.workers=1", "stage.base.steps=6", "stage.base.validate_every=3",
        "templates.finetune.steps=3", "templates.finetune.validate_every=2",
        "templates.joint.steps=4", "templates.joint.validate_every=2",
        "templates.joint.max_tokens=512", "templates.finetune.max_tokens=512",
        "stage.base.max_tokens=512", "train.valid_limit=8", f"report.out='{out}'",
        "report.discussion='none'", f"report.models.out='{d}/models'",
    ] + [f"stage.{s}.limit=3" for s in ("eval-supervised", "eval-zero", "eval-s1-supervised",
                                        "eval-s1-zero", "eval-alpha", "eval-theta0",
                                        "eval-theta0-zero")]
    argv = ["experiment", "run", "reproduction-seed1", "--run", run_dir, *_sets(sets)]
    assert main(argv) == 0
    return run_dir, out, argv, str(d)


def test_shortened_reproduction_writes_every_section(shortened):
    run_dir, out, _, _ = shortened
    md = open(os.path.join(out, "reproduction.md"), encoding="utf-8").read()
    for head in ("## Protocol", "## Convergence", "## Supervised directions", "## Zero-shot",
                 "## Seeds", "## Mask similarity", "alpha chosen on validation loss",
                 "## alpha sweep", "LaSS-a0.5 (alpha=0.5) vs dense",
                 "LaSS-a0.7 (alpha=0.7) vs dense",
                 "LaSS vs dense", "LaSS vs shared", "random vs dense", "every seed pooled",
                 "Paired bootstrap, LaSS vs dense"):
        assert head in md, head
    for png in ("curves.png", "similarity.png", "layer_similarity.png"):
        assert os.path.getsize(os.path.join(out, png)) > 1000
    rep = json.load(open(os.path.join(out, "reproduction.json")))
    assert set(rep["supervised"]) == {"theta0", "dense", "LaSS", "shared", "random"}
    assert all(len(r) == 6 for r in rep["supervised"].values())
    assert set(rep["zero_shot"]) == {"theta0", "dense", "LaSS"}
    assert rep["selected"]["alpha"] in (0.5, 0.7)
    sweep = rep["sweep"]
    assert set(sweep["results"]) == {"LaSS-a0.5", "LaSS-a0.7"} and sweep["chosen"] == rep[
        "selected"]["alpha"]
    # the chosen α's test scores are the LaSS system's (same checkpoint, masks and rows)
    chosen = sweep["results"][f"LaSS-a{sweep['chosen']}"]
    assert {d: r["bleu"] for d, r in chosen.items()} == {
        d: r["bleu"] for d, r in rep["supervised"]["LaSS"].items()}
    sel = json.load(open(os.path.join(run_dir, "experiment", "selected.json")))["alpha"]
    assert sel["value"] == min((0.5, 0.7), key=lambda a: sel["valid_loss"][str(a)])
    assert {"ft-s1/en-de", "joint-s1", "dense-s1", "joint-a0.5", "joint-a0.7"} <= set(
        rep["stages"])
    assert json.load(open(os.path.join(run_dir, "ft-s1/en-de/ckpt/state.json")))[
        "config"]["seed"] == 1


def test_rerun_resumes_and_publish(shortened, capsys):
    run_dir, out, argv, d = shortened
    before = os.path.getmtime(os.path.join(run_dir, "base", "ckpt", "state.json"))
    capsys.readouterr()
    assert main(argv) == 0
    log = capsys.readouterr().out
    assert log.count("done before") == 12 and "job(s)" not in log
    assert os.path.getmtime(os.path.join(run_dir, "base", "ckpt", "state.json")) == before
    assert main(["experiment", "publish", "reproduction", "--run", run_dir, "--out",
                 f"{d}/models"]) == 0
    assert os.path.exists(os.path.join(d, "models", "lass", "ckpt", "model.safetensors"))
    assert main(["evaluate", "--run", f"{d}/models", "--stage", "lass", "--masks",
                 "masks.safetensors", "--directions", "en-de", "--limit", "2", "--quiet",
                 "--device", "cpu"]) == 0


def _cli(*args, env=None, timeout=600):
    e = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    return run_process_group([sys.executable, "-m", "lass_sparse.cli", *args], env=e,
                             timeout=timeout)


def test_two_workers_one_process_group_spread_the_jobs(tmp_path):
    """DDP base on both workers; fine-tunes and evaluation shares taken from one queue."""
    cfg = _write(tmp_path, """
name = "two"
[run]
corpus = "demo"
pairs = ["en-de"]
workers = 2
threads = 1
device = "cpu"
[train]
quiet = true
[[stage]]
name = "base"
kind = "train"
ddp = true
steps = 4
batch_size = 8
[[stage]]
name = "finetune"
kind = "finetune"
init = "base"
steps = 2
batch_size = 8
[[stage]]
name = "prune"
kind = "prune"
alpha = 0.5
[[stage]]
name = "eval"
kind = "evaluate"
limit = 2
beam = 1
systems = { theta0 = "base", lass = "base@masks.safetensors" }
[report]
supervised = "eval"
baseline = "theta0"
""")
    run_dir = str(tmp_path / "run")
    r = _cli("experiment", "run", cfg, "--run", run_dir, *_sets(TINY))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    done = {}
    for f in os.listdir(os.path.join(run_dir, "experiment", "done")):
        done[f] = json.load(open(os.path.join(run_dir, "experiment", "done", f)))
    assert len(done) == 6  # base, 2 fine-tunes, prune, 2 evaluation shares
    ran = [line.split("]", 1)[1].split(": ")[0].strip() for line in r.stdout.splitlines()
           if "(worker " in line]
    assert len(ran) == len(set(ran)) == 5, r.stdout  # each single job once, on either worker
    assert "(all 2 workers)" in r.stdout
    st = json.load(open(os.path.join(run_dir, "base", "ckpt", "state.json")))
    assert st["step"] == 4
    assert os.path.exists(os.path.join(run_dir, "results", "two.md"))


SIDE_BY_SIDE = """
name = "side"
[run]
corpus = "demo"
pairs = ["en-de", "en-fr"]
threads = 1
device = "cpu"
[train]
quiet = true
[[stage]]
name = "base"
kind = "train"
steps = 4
batch_size = 8
[[stage]]
name = "finetune"
kind = "finetune"
init = "base"
steps = 2
batch_size = 8
[[stage]]
name = "prune"
kind = "prune"
alpha = 0.5
[[stage]]
name = "joint-x"
kind = "joint"
masks = "masks.safetensors"
init = "base"
directions = ["en-de", "de-en"]
steps = 6
batch_size = 8
[[stage]]
name = "joint-y"
kind = "joint"
after = "prune"
masks = "masks.safetensors"
init = "base"
directions = ["en-fr", "fr-en"]
steps = 3
batch_size = 8
[[stage]]
name = "eval"
kind = "evaluate"
after = "prune"
limit = 2
beam = 1
systems = { theta0 = "base" }
[report]
supervised = "eval"
"""


def test_masked_jobs_side_by_side_equal_the_same_jobs_alone(tmp_path):
    """Two masked joint stages (other directions, other lengths) and an evaluation in one wave
    of 2 workers (one process group): no job may join a collective of another (they once
    all-gathered their pairs: the optimizer then moved the other job's masks, and a joint stage
    left alone beside a finished one deadlocked). Each joint checkpoint must equal, bit for bit,
    the one a single worker trains alone."""
    from safetensors.torch import load_file

    cfg = _write(tmp_path, SIDE_BY_SIDE)
    runs = {}
    for workers in (1, 2):
        run_dir = str(tmp_path / f"w{workers}")
        r = _cli("experiment", "run", cfg, "--run", run_dir, *_sets(TINY + [
            f"run.workers={workers}"]), timeout=180)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        runs[workers] = run_dir
    def last(run_dir, stage, kind):  # the last checkpoint's weights / optimizer state
        folder = os.path.join(run_dir, stage, "ckpt")
        (f,) = [x for x in os.listdir(folder) if x.startswith(kind)]
        return load_file(os.path.join(folder, f))

    for stage, kind in [(s, k) for s in ("joint-x", "joint-y") for k in ("model", "optim")]:
        one, two = (last(runs[w], stage, kind) for w in (1, 2))
        assert one.keys() == two.keys()
        assert all(torch.equal(one[k], two[k]) for k in one), (stage, kind)


def test_sigterm_to_the_launcher_stops_the_ranks_with_one_line(tmp_path):
    """SIGTERM to ``--nproc-per-node`` (e.g. ``kill``, a batch system): the ranks stop, exit
    128 + 15, one line that says how to resume (no 'internal error')."""
    import signal
    import time

    run_dir = str(tmp_path / "run")
    p = subprocess.Popen(
        [sys.executable, "-m", "lass_sparse.cli", "train", "--run", run_dir, "--corpus", "demo",
         "--pairs", "en-de", "--max-train", "40", "--vocab-size", "300", "--steps", "100000",
         "--batch-size", "4", "--quiet", "--device", "cpu", "--nproc-per-node", "2"],
        env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    log = os.path.join(run_dir, "base", "log.jsonl")
    deadline = time.time() + 120
    while not os.path.exists(log) and time.time() < deadline and p.poll() is None:
        time.sleep(0.5)
    assert os.path.exists(log), p.communicate(timeout=60)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 128 + signal.SIGTERM, err
    lines = [x for x in err.splitlines() if x.startswith("lass-sparse:")]
    assert lines == ["lass-sparse: stopped by signal SIGTERM; rerun the same command to resume"]
    assert "internal error" not in err


def test_nproc_per_node_starts_the_ranks(tmp_path):
    """``lass-sparse train --nproc-per-node 2`` (no torchrun parser: ``--run`` is ours)."""
    run_dir = str(tmp_path / "run")
    r = _cli("train", "--run", run_dir, "--corpus", "demo", "--pairs", "en-de", "--max-train",
             "40", "--vocab-size", "300", "--steps", "2", "--batch-size", "4", "--quiet",
             "--device", "cpu", "--nproc-per-node", "2")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    log = [json.loads(x) for x in open(os.path.join(run_dir, "base", "log.jsonl"))]
    assert any(rec.get("world_size") == 2 for rec in log)
    r = _cli("prune", "--run", run_dir, "--nproc-per-node", "2")
    assert r.returncode == 2 and "unrecognized arguments" in r.stderr


def test_extension_stages_and_report_section(tmp_path):
    """extend (paper, strict reusing its fine-tunes), the strict-mode weight check and the
    report's extension section, on a 2-pair toy run."""
    cfg = _write(tmp_path, """
name = "ext"
[run]
corpus = "demo"
pairs = ["en-de", "en-fr"]
workers = 1
[train]
quiet = true
batch_size = 8
[[stage]]
name = "base"
kind = "train"
steps = 4
directions = ["en-de", "de-en"]
[[stage]]
name = "finetune"
kind = "finetune"
init = "base"
steps = 2
directions = ["en-de", "de-en"]
[[stage]]
name = "prune"
kind = "prune"
alpha = 0.5
directions = ["en-de", "de-en"]
[[stage]]
name = "joint"
kind = "joint"
masks = "masks.safetensors"
steps = 2
directions = ["en-de", "de-en"]
[[stage]]
name = "extend-paper"
kind = "extend"
directions = ["en-fr", "fr-en"]
masks = "masks.safetensors"
init = "joint"
ft_steps = 2
steps = 3
out = "extend-paper"
[[stage]]
name = "extend-strict"
kind = "extend"
directions = ["en-fr", "fr-en"]
masks = "masks.safetensors"
init = "joint"
ft_steps = 2
steps = 3
strict = true
copy_finetunes_from = "extend-paper"
out = "extend-strict"
[[stage]]
name = "check"
kind = "weight_change"
before = "joint"
after_stages = ["extend-paper", "extend-strict"]
masks = "masks.safetensors"
[[stage]]
name = "eval-new"
kind = "evaluate"
directions = ["en-fr", "fr-en"]
limit = 2
beam = 1
[stage.systems]
theta0 = "base"
paper = "extend-paper@extend-paper/masks.safetensors"
strict = "extend-strict@extend-strict/masks.safetensors"
[[stage]]
name = "eval-old"
kind = "evaluate"
after = "check"
directions = ["en-de", "de-en"]
limit = 2
beam = 1
[stage.systems]
LaSS = "joint@masks.safetensors"
paper = "extend-paper@extend-paper/masks.safetensors"
strict = "extend-strict@extend-strict/masks.safetensors"
[report.extension]
new = "eval-new"
old = "eval-old"
reference = "LaSS"
reference_eval = "eval-old"
check = "check"
new_baseline = "theta0"
""")
    run_dir, out = str(tmp_path / "run"), str(tmp_path / "out")
    assert main(["experiment", "run", cfg, "--run", run_dir, *_sets(TINY)]) == 0
    assert main(["experiment", "report", cfg, "--run", run_dir, "--out", out]) == 0
    change = json.load(open(os.path.join(run_dir, "experiment", "check.json")))
    assert change["extend-strict"] == 0.0 and change["extend-paper"] > 0.0
    # strict mode reused paper mode's fine-tunes (copied, not retrained)
    for d in ("en-fr", "fr-en"):
        a = os.path.join(run_dir, "extend-paper", "ft", d, "ckpt", "model-00000002.safetensors")
        b = os.path.join(run_dir, "extend-strict", "ft", d, "ckpt", "model-00000002.safetensors")
        assert open(a, "rb").read() == open(b, "rb").read()
        log = open(os.path.join(run_dir, "extend-strict", "ft", d, "log.jsonl")).read()
        assert log == open(os.path.join(run_dir, "extend-paper", "ft", d, "log.jsonl")).read()
    md = open(os.path.join(out, "ext.md"), encoding="utf-8").read()
    assert "## Extension: a new pair" in md and "extend-strict 0" in md
    assert "| en-fr |" in md and "| old direction | LaSS | paper | Δ | strict | Δ |" in md
    # the room strict mode has: new mask weights outside every old mask, counted unpacked here
    from lass_sparse import MaskBank, unpack_mask

    old_bank = MaskBank.load(os.path.join(run_dir, "masks.safetensors"))
    ext_bank = MaskBank.load(os.path.join(run_dir, "extend-strict", "masks.safetensors"))
    kept = free = 0
    for n, shape in ext_bank.shapes.items():
        used = torch.zeros(shape, dtype=torch.bool)
        for d in old_bank.pairs:
            used |= unpack_mask(old_bank.bits(d, n), shape[-1])
        for d in ("en-fr", "fr-en"):
            m = unpack_mask(ext_bank.bits(d, n), shape[-1])
            kept, free = kept + int(m.sum()), free + int((m & ~used).sum())
    room = json.load(open(os.path.join(out, "ext.json")))["extension_room"]
    assert room["extend-strict"] == pytest.approx(free / kept)
    assert f"extend-strict {100 * free / kept:.2f}%" in md
