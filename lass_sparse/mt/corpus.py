"""Corpus reading: English-centric TSV pairs + multi-way valid/test (DESIGN §5).

Layout of a corpus folder: ``train.en-XX.tsv.gz`` (``English<TAB>XX`` per line, used in both
directions) and ``valid.tsv.gz`` / ``test.tsv.gz`` (multi-way, header line naming the languages).
``"demo"`` names the subset bundled with the package. A user's own multi-way test file:
:func:`read_test_file`; the builder of the full corpus: :mod:`lass_sparse.mt.corpus_build`.
"""

from __future__ import annotations

import gzip
import os
import re
import zlib
from dataclasses import dataclass, field
from importlib import resources

from .direction import LANG_CODE, Direction

LANGS = ("en", "de", "fr", "es", "it", "pt", "ru", "zh", "ar")


def demo_corpus_path() -> str:
    return str(resources.files("lass_sparse") / "data" / "demo")


def resolve_corpus(path: str) -> str:
    if path == "demo":
        return demo_corpus_path()
    if not os.path.isdir(path):
        raise FileNotFoundError(f"corpus folder {path!r} does not exist (or pass 'demo')")
    return path


@dataclass
class Corpus:
    """Training pairs per English-centric pair, multi-way valid/test, and what was skipped."""

    root: str
    train: dict[str, list[tuple[str, str]]]  # "en-de" -> [(english, german)]
    valid: list[dict[str, str]]
    test: list[dict[str, str]]
    skipped: list[str] = field(default_factory=list)  # "file:line: reason"
    max_train: int | None = None  # cap on examples per pair (pivoted directions too)
    _pivots: dict = field(default_factory=dict, repr=False)

    @property
    def pairs(self) -> list[str]:
        return sorted(self.train)

    @property
    def directions(self) -> list[str]:
        out = []
        for p in self.pairs:
            d = Direction.parse(p)
            out += [str(d), str(d.reverse())]
        return out

    def examples(self, direction: str) -> list[tuple[str, str]]:
        """(source, target) training examples of one direction."""
        d = Direction.parse(direction)
        if str(d) in self.train:
            return list(self.train[str(d)])
        if str(d.reverse()) in self.train:
            return [(b, a) for a, b in self.train[str(d.reverse())]]
        if d.is_zero_shot():
            return self.pivot(d.src, d.tgt)
        raise KeyError(f"no training data for direction {direction!r}; pairs in "
                       f"{self.root}: {self.pairs}")

    def pivot(self, src: str, tgt: str) -> list[tuple[str, str]]:
        """(src, tgt) examples of a non-English direction built through English: the rows of
        ``train.en-{src}`` and ``train.en-{tgt}`` (whole files) with the same English side, in
        the order of the first file, the first ``max_train`` of them. The valid/test rows are
        held out of every training file, so they stay unseen. For adding a new pair to a model
        trained on English-centric pairs (``lass-sparse extend --pair de-fr fr-de``)."""
        key = tuple(sorted((src, tgt)))
        if key not in self._pivots:
            files = {x: os.path.join(self.root, f"train.en-{x}.tsv.gz") for x in key}
            missing = [f for f in files.values() if not os.path.exists(f)]
            if missing:
                raise KeyError(f"no training data for direction {src}-{tgt}: pivoting through "
                               f"English needs {' and '.join(missing)}")
            a, b = key
            other = dict(read_pairs(files[b], self.skipped))
            rows = [(x, other[en]) for en, x in read_pairs(files[a], self.skipped)
                    if en in other]
            if not rows:
                raise ValueError(f"no English sentence is shared by {files[a]} and {files[b]}")
            self._pivots[key] = rows[: self.max_train] if self.max_train else rows
        rows = self._pivots[key]
        return list(rows) if src == key[0] else [(y, x) for x, y in rows]

    def eval_set(self, split: str, direction: str, limit: int | None = None):
        """(sources, references) of ``direction`` from the multi-way ``split``."""
        rows = {"valid": self.valid, "test": self.test}[split]
        return eval_pairs(rows, direction, limit, name=split)


def eval_pairs(rows: list[dict[str, str]], direction: str, limit: int | None = None, *,
               name: str = "test") -> tuple[list[str], list[str]]:
    """(sources, references) of ``direction`` from multi-way ``rows`` (first ``limit`` rows if
    given). A missing column raises ``KeyError`` naming the set (``name``) and its columns."""
    src, tgt = Direction.parse(direction)
    if rows and (src not in rows[0] or tgt not in rows[0]):
        raise KeyError(f"{name} set has no {src}/{tgt} column (has {sorted(rows[0])})")
    rows = rows[:limit] if limit else rows
    return [r[src] for r in rows], [r[tgt] for r in rows]


def _lines(path: str, skipped: list[str]):
    with gzip.open(path, "rb") as f:
        for i, raw in enumerate(f, 1):
            try:
                yield i, raw.decode("utf-8").rstrip("\n").rstrip("\r")
            except UnicodeDecodeError:
                skipped.append(f"{path}:{i}: not valid UTF-8")


def read_pairs(path: str, skipped: list[str], limit: int | None = None) -> list[tuple[str, str]]:
    """``English<TAB>XX`` lines; a malformed line is reported as file:line, skipped, counted."""
    out = []
    for i, line in _lines(path, skipped):
        parts = line.split("\t")
        if len(parts) != 2 or not parts[0].strip() or not parts[1].strip():
            skipped.append(f"{path}:{i}: expected 2 non-empty tab-separated fields, "
                           f"got {len(parts)}")
            continue
        out.append((parts[0].strip(), parts[1].strip()))
        if limit and len(out) >= limit:
            break
    return out


def read_multiway(path: str, skipped: list[str]) -> list[dict[str, str]]:
    rows: list[dict[str, str]] = []
    header: list[str] | None = None
    for i, line in _lines(path, skipped):
        parts = line.split("\t")
        if header is None:
            header = parts
            continue
        if len(parts) != len(header) or not all(p.strip() for p in parts):
            skipped.append(f"{path}:{i}: expected {len(header)} non-empty fields")
            continue
        rows.append(dict(zip(header, (p.strip() for p in parts))))
    return rows


def _strict_lines(path: str):
    """(line number, text) of a plain or gzipped (``.gz``) UTF-8 file; errors are ValueErrors."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"test file {path!r} does not exist")
    with open(path, "rb") as f:
        magic = f.read(2)
    gz = path.endswith(".gz")
    if gz and magic != b"\x1f\x8b":
        raise ValueError(f"{path}: named .gz but is not gzip-compressed")
    if not gz and magic == b"\x1f\x8b":
        raise ValueError(f"{path}: is gzip-compressed; name it .tsv.gz")
    i = 0
    try:
        with gzip.open(path, "rb") if gz else open(path, "rb") as f:
            for i, raw in enumerate(f, 1):
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise ValueError(f"{path}:{i}: not valid UTF-8 ({e.reason} at byte "
                                     f"{e.start})") from None
                yield i, text.rstrip("\n").rstrip("\r")
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise ValueError(f"{path}:{i + 1}: corrupt or truncated gzip data ({e})") from None


def read_test_file(path: str) -> list[dict[str, str]]:
    """A user's multi-way test set: ``.tsv`` or ``.tsv.gz``, a header line of distinct language
    codes (``[a-z]{2,3}``, at least two), then one row per line with a non-empty field per
    language. Unlike the corpus reader nothing is skipped: any malformed line raises
    ``ValueError`` as ``file:line: what was expected`` (a missing file: ``FileNotFoundError``)."""
    header: list[str] | None = None
    rows: list[dict[str, str]] = []
    for i, line in _strict_lines(path):
        parts = line.split("\t")
        if header is None:
            header = [p.strip() for p in parts]
            if header:
                header[0] = header[0].lstrip("\ufeff")  # a UTF-8 byte-order mark
            for j, code in enumerate(header, 1):
                if not LANG_CODE.fullmatch(code):
                    raise ValueError(f"{path}:{i}: header field {j} is {code!r}, expected a "
                                     f"language code of 2-3 lowercase letters (e.g. 'en')")
            dup = sorted({c for c in header if header.count(c) > 1})
            if dup:
                raise ValueError(f"{path}:{i}: duplicate language column(s) {dup} in header")
            if len(header) < 2:
                raise ValueError(f"{path}:{i}: header names {len(header)} language, expected "
                                 f"at least 2 tab-separated language codes")
            continue
        if len(parts) != len(header):
            raise ValueError(f"{path}:{i}: expected {len(header)} tab-separated fields "
                             f"({', '.join(header)}), got {len(parts)}")
        for lang, p in zip(header, parts):
            if not p.strip():
                raise ValueError(f"{path}:{i}: empty {lang} field (expected {len(header)} "
                                 f"non-empty fields: {', '.join(header)})")
        rows.append(dict(zip(header, (p.strip() for p in parts))))
    if header is None:
        raise ValueError(f"{path}: empty file (expected a header line of language codes)")
    if not rows:
        raise ValueError(f"{path}: no rows after the header line")
    return rows


def load_corpus(path: str, pairs: list[str] | None = None, max_train: int | None = None) -> Corpus:
    """Read a corpus folder (or ``"demo"``). ``pairs``: restrict to these English-centric pairs
    (``"en-de"``; ``"de-en"`` means the same file); ``max_train``: first N pairs of each."""
    root = resolve_corpus(path)
    available = {}
    for name in sorted(os.listdir(root)):
        m = re.match(r"^train\.([a-z]+-[a-z]+)\.tsv\.gz$", name)
        if m:
            available[m.group(1)] = os.path.join(root, name)
    if not available:
        raise FileNotFoundError(f"{root} has no train.xx-yy.tsv.gz files")
    want = sorted(available)
    if pairs:
        want = []
        for p in pairs:
            a, b = Direction.parse(p)
            key = f"{a}-{b}" if f"{a}-{b}" in available else f"{b}-{a}"
            if key not in available:
                raise KeyError(f"unknown language pair {p!r}; {root} has {sorted(available)}")
            if key not in want:
                want.append(key)
    skipped: list[str] = []
    train = {p: read_pairs(available[p], skipped, max_train) for p in want}
    for p, ex in train.items():
        if not ex:
            raise ValueError(f"{available[p]} has no usable lines")
    split = {}
    for s in ("valid", "test"):
        f = os.path.join(root, f"{s}.tsv.gz")
        split[s] = read_multiway(f, skipped) if os.path.exists(f) else []
    return Corpus(root, train, split["valid"], split["test"], skipped, max_train)
