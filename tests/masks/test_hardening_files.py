"""Mask-bank files under corruption, and crash-safe writes (issue 20, items 3, 4 and 12).

A property-based suite mutates saved banks (bit flips, truncation, extension, splices, in the
header or the body): every mutant either loads the identical bank or raises one ``ValueError``
(:class:`MaskFileError`) naming the file. Hypothesis runs a CI profile by default (few examples,
no deadline: < 10 s on 2 loaded cores); ``LASS_FUZZ_PROFILE=thorough`` runs 50x as many.
"""

from __future__ import annotations

import json
import lzma
import os
import stat
import struct
import subprocess
import sys
import tracemalloc

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from lass_sparse import masks as M
from lass_sparse.masks import MaskBank, MaskFileError, atomic_write

settings.register_profile("lass-ci", max_examples=40, deadline=None, database=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("lass-thorough", max_examples=2000, deadline=None, database=None,
                          suppress_health_check=[HealthCheck.too_slow])
FUZZ = settings(settings.get_profile("lass-" + os.environ.get("LASS_FUZZ_PROFILE", "ci")))

SHAPES = {"enc.0.fc1.weight": (4, 40), "enc.0.attn.in_proj_weight": (6, 8),
          "dec.out.weight": (3, 1)}


def _bank(pairs=("en-de", "de-en", "en-fr")) -> MaskBank:
    g = torch.Generator().manual_seed(1)
    bank = MaskBank(SHAPES, alpha=0.5)
    for p in pairs:
        bank.add_pair(p, {n: torch.rand(s, generator=g) < 0.5 for n, s in SHAPES.items()})
    return bank


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("banks")
    bank = _bank()
    out = {"bank": bank, "dir": d}
    for layout in ("plain", "compact"):
        path = str(d / f"{layout}.safetensors")
        bank.save(path, compact=layout == "compact", codec="lzma")
        out[layout] = open(path, "rb").read()
    return out


def _header_len(data: bytes) -> int:
    return 8 + struct.unpack("<Q", data[:8])[0]


def _read(path):
    with safe_open(path, "pt") as f:
        return dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}


def _rewrite(path, meta, tensors, *, resign: bool):
    if resign:
        meta["meta_sha256"] = M._meta_digest(meta)
    save_file(tensors, path, metadata=meta)


def _load_same_or_clean_error(path, bank):
    try:
        got = MaskBank.load(path)
    except MaskFileError as e:
        assert path in str(e)
        assert "\n" not in str(e)
        return "refused"
    assert got.equal(bank) and got.alpha == bank.alpha and got.rule == bank.rule
    return "same"


# ------------------------------------------------------------------------- property-based fuzz

_mutation = st.one_of(
    st.tuples(st.just("flip"), st.lists(st.tuples(st.floats(0, 1, exclude_max=True),
                                                   st.integers(0, 7)), min_size=1, max_size=4)),
    st.tuples(st.just("flip-header"), st.lists(st.tuples(st.floats(0, 1, exclude_max=True),
                                                         st.integers(0, 7)),
                                               min_size=1, max_size=3)),
    st.tuples(st.just("truncate"), st.floats(0, 1, exclude_max=True)),
    st.tuples(st.just("extend"), st.binary(min_size=1, max_size=64)),
    st.tuples(st.just("splice"), st.tuples(st.floats(0, 1, exclude_max=True),
                                           st.binary(min_size=1, max_size=16))),
)


def _mutate(data: bytes, mutation) -> bytes:
    kind, arg = mutation
    d = bytearray(data)
    if kind in ("flip", "flip-header"):
        span = _header_len(data) if kind == "flip-header" else len(d)
        for pos, bit in arg:
            d[int(pos * span)] ^= 1 << bit
    elif kind == "truncate":
        del d[int(arg * len(d)):]
    elif kind == "extend":
        d += arg
    else:
        pos, junk = arg
        i = int(pos * len(d))
        d[i:i + len(junk)] = junk
    return bytes(d)


@pytest.mark.parametrize("layout", ["plain", "compact"])
@FUZZ
@given(mutation=_mutation)
def test_fuzz_mutated_file_loads_identically_or_raises_one_valueerror(files, layout, mutation):
    data = _mutate(files[layout], mutation)
    path = str(files["dir"] / f"mutant-{layout}.safetensors")
    with open(path, "wb") as f:
        f.write(data)
    outcome = _load_same_or_clean_error(path, files["bank"])
    if mutation[0] in ("truncate", "extend"):
        assert outcome == "refused"


@FUZZ
@given(field=st.sampled_from(["format_version", "layout", "alpha", "rule", "shapes", "pairs",
                              "sha256", "codec", "meta_sha256"]),
       value=st.one_of(st.text(max_size=12), st.sampled_from(
           ["[]", "{}", "null", "1.5", "-0.1", "NaN", "[\"en-de\"]", "{\"x\": [1]}", "zstd",
            "plain", "compact", "2", "1", '"en-de"', "[[[[[[[[[[[["])),
       resign=st.booleans())
def test_fuzz_edited_metadata_field_is_refused_naming_the_field(files, field, value, resign):
    """Any edit of one field: refused (naming that field, or a tensor / checksum it breaks), or
    the identical bank when the edit changes nothing."""
    src = str(files["dir"] / "meta-src.safetensors")
    with open(src, "wb") as f:
        f.write(files["compact"])
    meta, tensors = _read(src)
    original = dict(meta)
    path = str(files["dir"] / "meta-edit.safetensors")
    meta[field] = value
    _rewrite(path, meta, tensors, resign=resign and field != "meta_sha256")
    try:
        got = MaskBank.load(path)
    except MaskFileError as e:
        assert path in str(e)
        return
    assert got.equal(files["bank"])  # the bits are checksummed
    if value != original[field]:  # a consistent hand edit of a free-form field
        assert resign and field in ("rule", "alpha")
        assert (got.rule if field == "rule" else json.dumps(got.alpha)) == value or (
            field == "alpha" and json.loads(value) == got.alpha)


# ------------------------------------------------------------- the concrete cases (4)

def _edit(files, which, resign, **changes):
    src = str(files["dir"] / f"{which}.safetensors")
    with open(src, "wb") as f:
        f.write(files[which])
    meta, tensors = _read(src)
    for k, v in changes.items():
        if v is None:
            meta.pop(k, None)
        else:
            meta[k] = v
    path = str(files["dir"] / "edited.safetensors")
    _rewrite(path, meta, tensors, resign=resign)
    return path


@pytest.mark.parametrize("layout", ["plain", "compact"])
@pytest.mark.parametrize("field,value", [
    ("shapes", None),  # set below: K 40 -> 50
    ("alpha", "1.5"),
    ("rule", "random"),
    ("pairs", "[]"),
    ("layout", "sparse"),
])
def test_header_edits_are_caught_by_the_metadata_checksum(files, layout, field, value):
    """Before: a different bank (K 40->50, alpha 0.5->1.5, rule renamed) loaded without error."""
    if field == "shapes":
        shapes = {n: list(s) for n, s in SHAPES.items()}
        shapes["enc.0.fc1.weight"] = [4, 50]
        value = json.dumps(shapes)
    path = _edit(files, layout, resign=False, **{field: value})
    with pytest.raises(MaskFileError, match=r"edited\.safetensors: field 'meta_sha256'"):
        MaskBank.load(path)


@pytest.mark.parametrize("changes,match", [
    ({"pairs": "[]"}, "field 'sha256'"),
    ({"layout": "sparse"}, "field 'layout'"),
    ({"codec": "brotli"}, "field 'codec'"),
    ({"alpha": "1.5"}, "field 'alpha'"),
    ({"alpha": "true"}, "field 'alpha'"),
    ({"pairs": '["en-de", "en-de"]'}, "field 'pairs'"),
    ({"pairs": "{"}, "field 'pairs' is not valid JSON"),
    ({"shapes": '{"a": [4, -1]}'}, "field 'shapes'"),
    ({"shapes": "[" * 100000}, "field 'shapes' is not valid JSON"),
    ({"rule": None}, "field 'rule' is missing"),
    ({"codec": None}, "field 'codec' is missing"),
    ({"extra": "1"}, "field 'extra' is unknown"),
    ({"sha256": '{"a": "b"}'}, "field 'sha256'"),
])
def test_consistently_edited_fields_are_validated(files, changes, match):
    """Even with the metadata checksum recomputed (a hand-edited file), each field is validated:
    before, `pairs: []` and unknown layouts or codecs were accepted and a missing field raised a
    raw KeyError."""
    path = _edit(files, "compact", resign=True, **changes)
    with pytest.raises(MaskFileError, match=match) as e:
        MaskBank.load(path)
    assert "edited.safetensors" in str(e.value)


def test_consistent_k_change_is_refused_naming_the_tensor(files):
    shapes = {n: list(s) for n, s in SHAPES.items()}
    shapes["enc.0.fc1.weight"] = [4, 70]  # 3 words per row instead of 2
    for layout in ("plain", "compact"):
        path = _edit(files, layout, resign=True, shapes=json.dumps(shapes))
        with pytest.raises(MaskFileError, match="enc.0.fc1.weight|truncated"):
            MaskBank.load(path)


def test_missing_meta_checksum_is_refused_and_version_1_files_still_load(files):
    path = _edit(files, "compact", resign=False, meta_sha256=None)
    with pytest.raises(MaskFileError, match="field 'meta_sha256' is missing"):
        MaskBank.load(path)
    path = _edit(files, "compact", resign=False, meta_sha256=None, format_version="1")
    assert MaskBank.load(path).equal(files["bank"])  # files written before the checksum
    with pytest.raises(MaskFileError, match="format version 3"):
        MaskBank.load(_edit(files, "compact", resign=True, format_version="3"))


def test_extra_tensor_in_plain_file_is_refused(files):
    src = str(files["dir"] / "plain.safetensors")
    with open(src, "wb") as f:
        f.write(files["plain"])
    meta, tensors = _read(src)
    tensors["xx-yy::enc.0.fc1.weight"] = tensors["en-de::enc.0.fc1.weight"].clone()
    path = str(files["dir"] / "extra.safetensors")
    _rewrite(path, meta, tensors, resign=False)
    with pytest.raises(MaskFileError, match="unexpected \\['xx-yy::enc.0.fc1.weight'\\]"):
        MaskBank.load(path)


def _with_blob(files, blob: bytes, name: str) -> str:
    src = str(files["dir"] / "compact.safetensors")
    with open(src, "wb") as f:
        f.write(files["compact"])
    meta, _ = _read(src)
    path = str(files["dir"] / name)
    _rewrite(path, meta, {"__compact__": torch.frombuffer(bytearray(blob), dtype=torch.uint8)},
             resign=False)
    return path


def _raw_blob(files) -> bytes:
    src = str(files["dir"] / "compact.safetensors")
    with open(src, "wb") as f:
        f.write(files["compact"])
    _, tensors = _read(src)
    return lzma.decompress(tensors["__compact__"].numpy().tobytes())


def test_trailing_or_missing_decompressed_bytes_are_refused(files):
    raw = _raw_blob(files)
    path = _with_blob(files, lzma.compress(raw + bytes(16)), "trailing.safetensors")
    with pytest.raises(MaskFileError, match="trailing.safetensors.*more than the"):
        MaskBank.load(path)
    path = _with_blob(files, lzma.compress(raw[:-4]), "short.safetensors")
    with pytest.raises(MaskFileError, match="short.safetensors is truncated"):
        MaskBank.load(path)
    path = _with_blob(files, lzma.compress(raw) + b"junk", "junk.safetensors")
    with pytest.raises(MaskFileError, match="junk.safetensors.*after the end"):
        MaskBank.load(path)
    assert MaskBank.load(_with_blob(files, lzma.compress(raw), "ok.safetensors")).equal(
        files["bank"])


def test_decompression_bomb_is_refused_without_inflating(files):
    """Item 3: before, a small compact file grew memory by hundreds of MiB before failing."""
    c = lzma.LZMACompressor(preset=0)
    bomb = b"".join(c.compress(bytes(1 << 20)) for _ in range(64)) + c.flush()  # 64 MiB of 0
    assert len(bomb) < 64 << 10
    path = _with_blob(files, bomb, "bomb.safetensors")
    tracemalloc.start()
    try:
        with pytest.raises(MaskFileError, match="bomb.safetensors.*more than the .* bytes its "
                           "shapes imply"):
            MaskBank.load(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, peak


def test_empty_bank_round_trips(tmp_path):
    for compact in (False, True):
        path = str(tmp_path / f"empty{compact}.st")
        MaskBank(SHAPES, alpha=None).save(path, compact=compact, codec="lzma")
        got = MaskBank.load(path)
        assert got.pairs == [] and got.shapes == SHAPES and got.alpha is None


# -------------------------------------------------------------------- crash safety (item 12)

@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_atomic_write_creates_files_with_the_umask_mode(tmp_path, umask):
    old = os.umask(umask)
    try:
        path = str(tmp_path / "f.bin")
        atomic_write(path, b"x")
        plain = str(tmp_path / "g.bin")
        with open(plain, "wb"):
            pass
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~umask  # before: always 0o600
    assert stat.S_IMODE(os.stat(path).st_mode) == stat.S_IMODE(os.stat(plain).st_mode)


def test_atomic_write_fsyncs_the_directory_after_the_rename(tmp_path, monkeypatch):
    synced = []
    real = os.fsync

    def spy(fd):
        synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
        real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    atomic_write(str(tmp_path / "f.bin"), b"data")
    assert synced == [False, True]  # the file's data, then the folder (the rename)


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_atomic_write_removes_stale_temp_files_of_killed_writers(tmp_path):
    dead = tmp_path / f"{M._tmp_prefix(_dead_pid())}abcd1234.model-00000100.safetensors"
    live = tmp_path / f"{M._tmp_prefix(os.getppid())}abcd1234.state.json"  # kept
    other_host = tmp_path / f".tmp-{_dead_pid()}@00000000-abcd1234.state.json"  # by age only
    legacy_old = tmp_path / ".tmp-k2j3h4f5state.json"
    legacy_new = tmp_path / ".tmp-zz9zz9zzstate.json"
    for f in (dead, live, other_host, legacy_old, legacy_new):
        f.write_bytes(b"half")
    os.utime(legacy_old, (0, 0))
    atomic_write(str(tmp_path / "state.json"), b"{}")
    left = sorted(f for f in os.listdir(tmp_path) if f.startswith(".tmp-"))
    assert left == sorted([live.name, other_host.name, legacy_new.name])
    assert (tmp_path / "state.json").read_bytes() == b"{}"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_killed_write_leaves_the_old_file_and_a_temp_the_next_write_removes(tmp_path):
    path = tmp_path / "state.json"
    path.write_bytes(b"old")
    pid = os.fork()
    if pid == 0:  # the writer, killed between writing its temp file and the rename
        try:
            os.replace = lambda *a: os._exit(9)
            atomic_write(str(path), b"new")
        finally:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 9
    assert path.read_bytes() == b"old"
    assert [f for f in os.listdir(tmp_path) if f.startswith(".tmp-")]
    atomic_write(str(path), b"new")
    assert path.read_bytes() == b"new"
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp-")]


def test_plots_are_written_atomically(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from lass_sparse.lass import plots

    written = []
    real = plots.atomic_write

    def spy(path, data):
        written.append(path)
        real(path, data)

    monkeypatch.setattr(plots, "atomic_write", spy)
    bank = _bank()
    out = [plots.similarity_heatmap(bank, bank.pairs, str(tmp_path / "a" / "sim.png")),
           plots.layer_similarity_plot(bank, [("en-de", "de-en")], str(tmp_path / "lay.png")),
           plots.extension_plot({"lass": [{"step": 0, "new_bleu": 1.0, "others_bleu": 2.0}]},
                                str(tmp_path / "ext.png"))]
    assert written == out
    for p in out:
        assert open(p, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    monkeypatch.setattr(plots, "similarity_matrix", lambda *a: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        plots.similarity_heatmap(bank, bank.pairs, str(tmp_path / "b.png"))
    assert not os.path.exists(tmp_path / "b.png")
