"""Corpus build: .mo parsing, cleaning rules, multi-way split, and a .deb end to end (offline)."""

from __future__ import annotations

import gzip
import os
import shutil
import struct
import subprocess

import pytest

from lass_sparse.mt import corpus_build as C
from lass_sparse.mt.corpus import load_corpus


def write_mo(entries: list[tuple[bytes, bytes]], charset: str = "UTF-8") -> bytes:
    """A little-endian .mo with a header entry."""
    header = f"Content-Type: text/plain; charset={charset}\n".encode()
    items = sorted([(b"", header)] + entries)
    n = len(items)
    orig_off, trans_off = 28, 28 + 8 * n
    data_off = trans_off + 8 * n
    blob, otab, ttab = b"", b"", b""
    for mid, _ in items:
        otab += struct.pack("<2I", len(mid), data_off + len(blob))
        blob += mid + b"\0"
    for _, mstr in items:
        ttab += struct.pack("<2I", len(mstr), data_off + len(blob))
        blob += mstr + b"\0"
    return struct.pack("<7I", 0x950412DE, 0, n, orig_off, trans_off, 0, 0) + otab + ttab + blob


def test_read_mo_plurals_contexts_and_charset():
    mo = write_mo([(b"Open file", "Datei öffnen".encode("latin-1")),
                   (b"menu\x04Save all", b"Alle speichern"),
                   (b"%d file\x00%d files", b"%d Datei\x00%d Dateien"),
                   (b"untranslated", b"")], charset="ISO-8859-1")
    got = dict(C.read_mo(mo))
    assert got == {"Open file": "Datei öffnen", "Save all": "Alle speichern",
                   "%d file": "%d Datei"}
    with pytest.raises(ValueError, match="not a .mo"):
        C.read_mo(b"\0" * 40)


def test_cleaning_and_filters():
    assert C.clean("_Open  the\\nfile", "_") == "Open the file"
    assert C.clean("打开文件(_O)", "_") == "打开文件"
    assert C.clean("~Save ~As", "~") == "~Save ~As"  # twice: not a mnemonic, kept
    assert C.usable("Open the file", "Datei öffnen", "de")
    assert not C.usable("Open", "Öffnen", "de")  # one word
    assert not C.usable("Open the file", "Open the file", "de")  # not translated
    assert not C.usable("Open the file", "Open file", "ru")  # no Cyrillic
    assert C.usable("Open the file", "Открыть файл", "ru")
    assert C.mnemonic_chars(["_Open", "_Save", "Quit now"], False) == "_"


def test_split_is_multiway_and_disjoint():
    pairs = {lang: __import__("collections").Counter() for lang in C.TARGETS}
    for i in range(30):
        for lang in C.TARGETS:
            pairs[lang][(f"Sentence number {i}", f"{lang} translation {i} ")] += 1
    pairs["de"][("Only in German here", "Nur auf Deutsch")] += 1
    train, valid, test, pool = C.split(pairs, 5, 10, seed=1)
    assert pool == 30 and len(valid) == 5 and len(test) == 10
    held = {r[0] for r in valid + test}
    for items in train.values():
        assert not {en for en, _ in items} & held
    assert len(train["de"]) == 30 - 15 + 1
    assert C.split(pairs, 5, 10, seed=1) == (train, valid, test, pool)  # deterministic


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="dpkg-deb not installed")
def test_build_from_a_local_deb(tmp_path):
    root = tmp_path / "pkg"
    sentences = [f"Delete the selected item number {i}" for i in range(12)]
    tr = {"de": "Ausgewähltes Element {} löschen", "fr": "Supprimer l'élément {}",
          "es": "Eliminar el elemento {}", "it": "Elimina l'elemento {}",
          "pt_BR": "Excluir o item {}", "ru": "Удалить элемент {}", "zh_CN": "删除项目 {}",
          "ar": "حذف العنصر {}"}
    for loc, pattern in tr.items():
        d = root / "usr/share/locale" / loc / "LC_MESSAGES"
        d.mkdir(parents=True)
        (d / "demo.mo").write_bytes(write_mo(
            [(s.encode(), pattern.format(i).encode()) for i, s in enumerate(sentences)]))
    (root / "DEBIAN").mkdir()
    (root / "DEBIAN/control").write_text(
        "Package: lassdemo\nVersion: 1.0\nArchitecture: all\nMaintainer: x <x@y>\n"
        "Description: test\n")
    debs = tmp_path / "debs"
    debs.mkdir()
    subprocess.run(["dpkg-deb", "--build", str(root), str(debs / "lassdemo_1.0_all.deb")],
                   check=True, capture_output=True)
    out = str(tmp_path / "corpus")
    stats = C.build(out, ["lassdemo"], str(debs), n_valid=2, n_test=3, progress=False)
    assert stats["train"]["en-de"] == 7 and stats["valid"] == 2 and stats["test"] == 3
    c = load_corpus(out)
    assert len(c.train["en-ru"]) == 7 and c.test[0]["zh"].startswith("删除项目")
    first = open(os.path.join(out, "train.en-de.tsv.gz"), "rb").read()
    C.build(out, ["lassdemo"], str(debs), n_valid=2, n_test=3, progress=False)
    assert open(os.path.join(out, "train.en-de.tsv.gz"), "rb").read() == first  # same bytes
    with gzip.open(os.path.join(out, "valid.tsv.gz"), "rt") as f:
        assert f.readline().split() == ["en", *C.TARGETS]


def _write_train(root, pair: str, rows: list[tuple[str, str]]) -> None:
    with gzip.open(os.path.join(root, f"train.{pair}.tsv.gz"), "wt") as f:
        f.writelines(f"{a}\t{b}\n" for a, b in rows)


def test_non_english_direction_is_pivoted_through_english(tmp_path):
    root = str(tmp_path)
    _write_train(root, "en-de", [("one", "eins"), ("two", "zwei"), ("three", "drei"),
                                 ("four", "vier")])
    _write_train(root, "en-fr", [("four", "quatre"), ("two", "deux"), ("five", "cinq"),
                                 ("one", "un")])
    c = load_corpus(root)
    assert c.examples("de-fr") == [("eins", "un"), ("zwei", "deux"), ("vier", "quatre")]
    assert c.examples("fr-de") == [("un", "eins"), ("deux", "zwei"), ("quatre", "vier")]
    assert "de-fr" not in c.directions  # only English-centric pairs are trained by default
    # max_train caps the pivoted rows, which come from the whole files (not the capped pairs)
    capped = load_corpus(root, pairs=["en-de"], max_train=1)
    assert capped.examples("de-en") == [("eins", "one")]
    assert capped.examples("de-fr") == [("eins", "un")]
    with pytest.raises(KeyError, match="train.en-zh.tsv.gz"):
        c.examples("de-zh")
    _write_train(root, "en-es", [("six", "seis")])
    with pytest.raises(ValueError, match="no English sentence is shared"):
        load_corpus(root).examples("es-de")
