"""`lass-sparse` user errors (issue 20, items 10 and 11): each bad invocation prints one line
``lass-sparse: error: ...`` naming the file or argument, exits non-zero, and does no work first;
``--debug`` shows the traceback. Table-driven; a property-based pass feeds random bad numbers."""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lass_sparse.cli import build_parser, main

pytest.importorskip("sentencepiece")

from lass_sparse.lass import pipeline as P  # noqa: E402
from lass_sparse.lass.checkpoint import save_checkpoint  # noqa: E402


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A run folder (demo corpus, one pair) with a stage "base" checkpoint; no training."""
    d = str(tmp_path_factory.mktemp("clirun") / "R")
    run = P.prepare(d, "demo", "tiny", vocab_size=300, pairs=["en-de"], max_train=120)
    save_checkpoint(run.path("base", "ckpt"), run.new_model(), None, {"step": 1})
    return d


def _cli(argv, capsys):
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse errors
        code = e.code
    return code, capsys.readouterr().err


def _write(path, data: bytes):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    return path


def _corrupt_model_file(r):
    ckpt = os.path.join(r, "base", "ckpt")
    name = json.load(open(os.path.join(ckpt, "state.json")))["model_file"]
    _write(os.path.join(ckpt, name), b"\xff" * 64)  # safetensors: "header too large"


def _truncated_gzip(tmp):
    corpus = os.path.join(tmp, "corpus-trunc")
    data = gzip.compress(b"Open file\tDatei oeffnen\n" * 200)
    _write(os.path.join(corpus, "train.en-de.tsv.gz"), data[: len(data) // 2])
    return corpus


# (id, argv with R = run folder and T = tmp dir, setup(R, T) -> None, exit code, message regex)
CASES = [
    ("train-steps-negative", ["train", "--run", "R", "--steps", "-1"], None, 2,
     r"train: argument --steps: must be positive, got -1"),
    ("train-steps-zero", ["train", "--run", "R", "--steps", "0"], None, 2, r"--steps"),
    ("train-steps-text", ["train", "--run", "R", "--steps", "many"], None, 2,
     r"--steps: expected an integer >= 1, got 'many'"),
    ("train-batch-size", ["train", "--run", "R", "--batch-size", "0"], None, 2, "--batch-size"),
    ("train-max-tokens", ["train", "--run", "R", "--max-tokens", "-5"], None, 2,
     "--max-tokens"),
    ("train-validate-every", ["train", "--run", "R", "--validate-every", "-1"], None, 2,
     r"--validate-every: must be >= 0"),
    ("train-patience", ["train", "--run", "R", "--patience", "-2"], None, 2, "--patience"),
    ("train-lr", ["train", "--run", "R", "--lr", "0"], None, 2, r"--lr: must be in > 0"),
    ("train-lr-nan", ["train", "--run", "R", "--lr", "nan"], None, 2, "--lr"),
    ("finetune-dropout", ["finetune", "--run", "R", "--pair", "en-de", "--dropout", "1"], None,
     2, r"--dropout: must be in \[0, 1\)"),
    ("prune-alpha", ["prune", "--run", "R", "--alpha", "-0.1"], None, 2, "--alpha"),
    ("extend-alpha", ["extend", "--run", "R", "--pair", "en-xx", "--alpha", "2"], None, 2,
     r"extend: argument --alpha: must be in \[0, 1\), got 2"),
    ("translate-beam-0", ["translate", "--run", "R", "--pair", "en-de", "--beam", "0"], None,
     2, r"--beam: must be positive"),
    ("translate-beam-neg", ["translate", "--run", "R", "--pair", "en-de", "--beam", "-3"],
     None, 2, r"--beam: must be positive, got -3"),
    ("evaluate-limit-0", ["evaluate", "--run", "R", "--limit", "0"], None, 2,
     r"evaluate: argument --limit: must be positive"),
    ("evaluate-system", ["evaluate", "--run", "R", "--system", "lass"], None, 2,
     r"--system: expected NAME=STAGE or NAME=STAGE@MASKS, got 'lass'"),
    ("evaluate-bootstrap", ["evaluate", "--run", "R", "--bootstrap", "10"], None, 1,
     r"--bootstrap needs --baseline"),
    ("evaluate-test-missing", ["evaluate", "--run", "R", "--test", "T/nope.tsv"], None, 1,
     r"test file '.*nope.tsv' does not exist"),
    ("evaluate-test-bad", ["evaluate", "--run", "R", "--test", "T/bad.tsv"],
     lambda r, t: _write(os.path.join(t, "bad.tsv"), b"en\tde\nonly-one-field\n"), 1,
     r"bad.tsv:2: expected 2 tab-separated fields"),
    ("translate-binary-input", ["translate", "--run", "R", "--pair", "en-de", "--input",
                                "T/bin"],
     lambda r, t: _write(os.path.join(t, "bin"), b"ok\n\x89PNG\xff\xfe\n"), 1,
     r"--input .*bin is not UTF-8 text \(line 2"),
    ("translate-nul-input", ["translate", "--run", "R", "--pair", "en-de", "--input", "T/nul"],
     lambda r, t: _write(os.path.join(t, "nul"), b"a\nb\x00c\n"), 1, r"looks binary"),
    ("translate-missing-input", ["translate", "--run", "R", "--pair", "en-de", "--input",
                                 "T/none.txt"], None, 1, r"--input .*none.txt does not exist"),
    ("no-run-folder", ["translate", "--run", "T/norun", "--pair", "en-de", "--input", "T/in"],
     lambda r, t: _write(os.path.join(t, "in"), b"Open the file\n"), 1,
     r"norun is not a run folder \(no run.json\)"),
    ("bad-run-json", ["translate", "--run", "R", "--pair", "en-de", "--input", "T/in"],
     lambda r, t: (_write(os.path.join(t, "in"), b"Open\n"),
                   _write(os.path.join(r, "run.json"), b"{\"corpus\": ")), 1,
     r"run file .*run.json is corrupt \(not JSON"),
    ("run-json-field", ["prune", "--run", "R"],
     lambda r, t: _write(os.path.join(r, "run.json"), b'{"corpus": "demo"}'), 1,
     r"run.json: field 'pairs' is missing"),
    ("corrupt-checkpoint", ["translate", "--run", "R", "--stage", "base", "--pair", "en-de",
                            "--input", "T/in"],
     lambda r, t: (_write(os.path.join(t, "in"), b"Open\n"), _corrupt_model_file(r)), 1,
     r"checkpoint file .*model-00000001.safetensors is corrupt or truncated .*delete"),
    ("bad-state-json", ["translate", "--run", "R", "--stage", "base", "--pair", "en-de",
                        "--input", "T/in"],
     lambda r, t: (_write(os.path.join(t, "in"), b"Open\n"),
                   _write(os.path.join(r, "base", "ckpt", "state.json"), b"[1, 2")), 1,
     r"checkpoint state .*state.json is corrupt"),
    ("state-json-not-state", ["translate", "--run", "R", "--stage", "base", "--pair", "en-de",
                              "--input", "T/in"],
     lambda r, t: (_write(os.path.join(t, "in"), b"Open\n"),
                   _write(os.path.join(r, "base", "ckpt", "state.json"),
                          b'{"step": 1, "model_file": "../../../etc/passwd"}')), 1,
     r"model_file '../../../etc/passwd' is not a file name"),
    ("langtok-change", ["train", "--run", "R", "--langtok", "tgt", "--steps", "1"], None, 1,
     r"run .*R was created with --langtok src; it cannot change"),
    ("corpus-not-gzip", ["train", "--run", "T/new", "--corpus", "T/corpus", "--steps", "1"],
     lambda r, t: _write(os.path.join(t, "corpus", "train.en-de.tsv.gz"), b"Open\tOeffnen\n"),
     1, r"corpus file .*train.en-de.tsv.gz is not gzip-compressed"),
    ("corpus-truncated-gzip", ["train", "--run", "T/new", "--corpus", "T/corpus-trunc",
                               "--steps", "1"],
     lambda r, t: _truncated_gzip(t), 1, r"\(reading .*corpus-trunc/train.en-de.tsv.gz\)"),
    ("masks-corrupt", ["masks", "stats", "T/m.safetensors"],
     lambda r, t: _write(os.path.join(t, "m.safetensors"), b"\x10" + b"\x00" * 7 + b"{}"), 1,
     r"MaskBank.load: .*m.safetensors"),
    ("masks-missing", ["masks", "stats", "T/none.safetensors"], None, 1, r"none.safetensors"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_invocation_prints_one_line_and_exits_nonzero(case, base_run, tmp_path, capsys):
    _, argv, setup, want_code, pattern = case
    r = str(tmp_path / "R")
    shutil.copytree(base_run, r)
    t = str(tmp_path)
    if setup is not None:
        setup(r, t)
    argv = [r if a == "R" else a.replace("T/", t + "/") for a in argv]
    code, err = _cli(argv, capsys)
    assert code == want_code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lass-sparse: error: "), err
    assert "Traceback" not in err
    assert re.search(pattern, lines[0]), lines[0]
    if want_code == 2 or "no-run" in case[0]:  # refused before any work
        assert not os.path.exists(os.path.join(t, "new"))


def test_debug_shows_the_traceback(base_run, tmp_path, capsys):
    t = str(tmp_path)
    _write(os.path.join(t, "bin"), b"\xff\xfe")
    argv = ["translate", "--run", base_run, "--pair", "en-de", "--input", f"{t}/bin"]
    with pytest.raises(ValueError, match="not UTF-8"):
        main(argv + ["--debug"])
    assert main(argv) == 1


def test_missing_optional_package_names_the_extra(tmp_path, capsys, monkeypatch):
    """Item 11: a plain `pip install .` (no [lass] extra) then `lass-sparse train`."""
    monkeypatch.setitem(sys.modules, "sentencepiece", None)  # import sentencepiece fails
    code, err = _cli(["train", "--run", tmp_path / "R", "--steps", "1"], capsys)
    assert code == 2
    assert err.strip() == ("lass-sparse: error: `lass-sparse train` needs the Python package "
                           "'sentencepiece', which is not installed: "
                           'pip install "lass_sparse[lass]"')
    assert not os.path.exists(tmp_path / "R")  # checked before any work

    # the same message if the import fails deeper than the up-front check
    from lass_sparse.lass import commands

    monkeypatch.setattr(commands, "require_packages", lambda args: None)
    code, err = _cli(["train", "--run", tmp_path / "R2", "--pairs", "en-de", "--max-train", "20",
                      "--steps", "1", "--quiet"], capsys)
    assert code == 2 and 'pip install "lass_sparse[lass]"' in err and "sentencepiece" in err
    assert len(err.strip().splitlines()) == 1


def _valid(option: str, value: str) -> bool:
    """The reference rule the argparse types implement."""
    import math

    try:
        if option in ("--alpha", "--dropout", "--lr"):
            v = float(value)
            if not math.isfinite(v):
                return False
            return v > 0 if option == "--lr" else 0 <= v < 1
        v = int(value)
    except ValueError:
        return False
    return v >= (0 if option in ("--validate-every", "--patience") else 1)


_OPTIONS = ["--steps", "--batch-size", "--max-tokens", "--beam", "--limit", "--validate-every",
            "--patience", "--alpha", "--dropout", "--lr"]


@settings(max_examples=25, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(option=st.sampled_from(_OPTIONS),
       value=st.one_of(st.integers(-10**6, 10**6).map(str), st.floats().map(repr),
                       st.sampled_from(["-1", "nan", "inf", "-inf", "1e400", "", "x", "1.5",
                                        "2", "-0.5", "0x10", "0.5", "1", "0"])))
def test_fuzz_bad_numeric_arguments_are_refused_by_argparse(option, value, capsys):
    """Random values for the numeric options: exactly the invalid ones are refused, by argparse,
    with one line naming the option."""
    command = {"--beam": ["translate", "--pair", "en-de"], "--limit": ["evaluate"],
               "--alpha": ["prune"], "--dropout": ["finetune", "--pair", "en-de"]}.get(
        option, ["train"])
    parser = build_parser()
    argv = [command[0], "--run", "R", *command[1:], f"{option}={value}"]
    if _valid(option, value):
        args = parser.parse_args(argv)  # accepted, and never run here
        assert getattr(args, option[2:].replace("-", "_")) is not None
        return
    with pytest.raises(SystemExit) as e:  # parse only: nothing can run
        parser.parse_args(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2, (option, value, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lass-sparse: error: ")
    assert f"argument {option}" in lines[0]
