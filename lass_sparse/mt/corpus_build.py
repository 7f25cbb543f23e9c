"""``lass-sparse corpus build``: rebuild the English-centric corpus from Debian translations.

Downloads the packages (``apt-get download``, no root), reads their gettext ``.mo`` catalogs
straight out of ``dpkg-deb --fsys-tarfile`` (nothing installed), cleans and filters the
(English, translation) entries, builds the multi-way valid/test pool and the training files.
Deterministic: sorted iteration, fixed seeds, gzip without name or time; ``stats.json`` lists the
sha256 of every output. Rules as documented in the corpus README (see ``lass_sparse/data/demo``).
"""

from __future__ import annotations

import collections
import gzip
import hashlib
import io
import json
import os
import random
import re
import struct
import subprocess
import tarfile
import tempfile
import unicodedata
from collections.abc import Iterable, Iterator

from tqdm.auto import tqdm

from ..fileio import atomic_write

TARGETS = ("de", "fr", "es", "it", "pt", "ru", "zh", "ar")
LOCALES = {"de": "de", "fr": "fr", "es": "es", "it": "it", "pt_BR": "pt", "pt-BR": "pt",
           "ru": "ru", "zh_CN": "zh", "zh-CN": "zh", "ar": "ar"}
PACKAGES = (
    "apt aptitude-common bash binutils bison bsdextrautils coreutils cpio debconf-i18n diffutils "
    "dpkg e2fsprogs-l10n findutils gawk gcc-12-locales gdb gettext gettext-base git gnupg-l10n "
    "gnutls-bin grep iso-codes kbd libc-l10n libglib2.0-data libgnutls30 libgpg-error-l10n "
    "libgtk-3-common libpam0g libreoffice-l10n-ar libreoffice-l10n-de libreoffice-l10n-es "
    "libreoffice-l10n-fr libreoffice-l10n-it libreoffice-l10n-pt-br libreoffice-l10n-ru "
    "libreoffice-l10n-zh-cn libwww-perl lvm2 m4 make man-db mc-data nano parted passwd procps "
    "psmisc rsync sed shared-mime-info sharutils sudo tar texinfo util-linux-locales "
    "vim-runtime wdiff wget xz-utils"
).split()
MO_PATH = re.compile(r"(?:^|/)(?:usr/share/locale|usr/lib/libreoffice/program/resource)/"
                     r"([A-Za-z_-]+)/LC_MESSAGES/[^/]+\.mo$")
SPACE = re.compile(r"\s+")
PLACEHOLDER = re.compile(r"%[-+ #0-9.*]*[a-zA-Z%]|\{[^{}]*\}|\$[A-Z0-9_]+\$|%[A-Z0-9_]+%|<[^<>]+>")
CJK_MNEMONIC = re.compile(r"\s*[(（][_~&][A-Za-z0-9][)）]")
OWN_SCRIPT = {"ru": re.compile("[\u0400-\u04ff]"), "zh": re.compile("[\u4e00-\u9fff]"),
              "ar": re.compile("[\u0600-\u06ff]")}
LATIN_LETTER = re.compile(r"[A-Za-z\u00c0-\u024f]")


# ------------------------------------------------------------------------------- .mo catalogs


def read_mo(data: bytes, name: str = "<mo>") -> list[tuple[str, str]]:
    """(msgid, msgstr) entries of a compiled gettext catalog: plural entries give the singular
    and ``msgstr[0]``, message contexts are dropped, the header and empty entries skipped."""
    if len(data) < 28:
        raise ValueError(f"{name}: too short for a .mo file")
    magic = struct.unpack("<I", data[:4])[0]
    end = "<" if magic == 0x950412DE else ">" if magic == 0xDE120495 else None
    if end is None:
        raise ValueError(f"{name}: not a .mo file (magic {magic:#x})")
    _, n, orig_off, trans_off = struct.unpack(end + "4I", data[4:20])

    def table(off: int, i: int) -> bytes:
        length, pos = struct.unpack(end + "2I", data[off + 8 * i: off + 8 * i + 8])
        return data[pos:pos + length]

    raw = [(table(orig_off, i), table(trans_off, i)) for i in range(n)]
    charset = "utf-8"
    for mid, mstr in raw:
        if mid == b"":
            m = re.search(rb"charset=([-\w]+)", mstr)
            if m and m.group(1).lower() not in (b"charset", b""):
                charset = m.group(1).decode("ascii")
    out = []
    for mid, mstr in raw:
        if not mid:
            continue
        try:
            s_id, s_str = mid.decode(charset), mstr.decode(charset)
        except (UnicodeDecodeError, LookupError):
            continue
        s_id = s_id.split("\x04", 1)[-1].split("\x00", 1)[0]
        s_str = s_str.split("\x00", 1)[0]
        if s_id and s_str:
            out.append((s_id, s_str))
    return out


def mo_entries_of_deb(deb: str) -> Iterator[tuple[str, str, list[tuple[str, str]]]]:
    """(language, catalog path, entries) for each target-language catalog inside ``deb``."""
    tar_bytes = subprocess.run(["dpkg-deb", "--fsys-tarfile", deb], check=True,
                               capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tf:
        for member in sorted(tf.getmembers(), key=lambda m: m.name):
            m = MO_PATH.search(member.name)
            if not m or not member.isfile() or m.group(1) not in LOCALES:
                continue
            data = tf.extractfile(member).read()
            try:
                yield LOCALES[m.group(1)], member.name, read_mo(data, member.name)
            except ValueError:
                continue


# ------------------------------------------------------------------------------------ cleaning


def key(s: str) -> str:
    """Near-duplicate key: lowercased letters and digits only."""
    return "".join(ch for ch in s.lower() if ch.isalnum())


def mnemonic_chars(msgids: list[str], libreoffice: bool) -> str:
    """Accelerator markers a catalog uses: LibreOffice ``~`` and ``_``; elsewhere ``_``, ``&``,
    ``~`` when at least 1% of msgids start a word with it."""
    if libreoffice:
        return "~_"
    out = ""
    for c in "_&~":
        pat = re.compile(r"(?:^|[\s(>])" + re.escape(c) + r"[A-Za-z0-9]")
        hits = sum(1 for s in msgids if pat.search(s))
        if msgids and hits / len(msgids) >= 0.01:
            out += c
    return out


def strip_mnemonics(s: str, chars: str) -> str:
    s = CJK_MNEMONIC.sub("", s)
    for c in chars:
        if s.count(c) == 1:
            s = re.sub(re.escape(c) + r"(?=[^\W_])", "", s)
    return s


def clean(s: str, chars: str) -> str:
    s = unicodedata.normalize("NFC", s).replace("\\n", " ")
    return SPACE.sub(" ", strip_mnemonics(s, chars)).strip()


def usable(en: str, tr: str, lang: str) -> bool:
    """Filters: English ≥ 2 words besides placeholders, ≤ 200 chars, mostly Latin letters;
    translation ≤ 300 chars, has a letter (own script for ru/zh/ar), differs from the English."""
    words = PLACEHOLDER.sub(" ", en).split()
    if len([w for w in words if any(ch.isalpha() for ch in w)]) < 2 or len(en) > 200:
        return False
    letters = [ch for ch in en if ch.isalpha()]
    if not letters or sum(bool(LATIN_LETTER.match(ch)) for ch in letters) < 0.9 * len(letters):
        return False
    if sum(ch.isalpha() for ch in en) < 0.5 * len(en.replace(" ", "")):
        return False
    if len(tr) > 300 or not any(ch.isalpha() for ch in tr):
        return False
    if lang in OWN_SCRIPT and not OWN_SCRIPT[lang].search(tr):
        return False
    return key(en) != key(tr)


# ---------------------------------------------------------------------------------- assembling


def collect(catalogs: Iterable[tuple[str, str, list[tuple[str, str]]]]):
    """lang -> Counter of (english, translation) over all catalogs, cleaned and filtered."""
    pairs: dict[str, collections.Counter] = {lang: collections.Counter() for lang in TARGETS}
    for lang, path, entries in catalogs:
        chars = mnemonic_chars([e for e, _ in entries], "libreoffice" in path)
        for en, tr in entries:
            en, tr = clean(en, chars), clean(tr, chars)
            if usable(en, tr, lang):
                pairs[lang][(en, tr)] += 1
    return pairs


def split(pairs: dict[str, collections.Counter], n_valid: int, n_test: int, seed: int):
    """Multi-way valid/test from English sentences translated in every language; the rest is
    training data (minus every pair whose English key is in valid/test)."""
    best: dict[str, dict[str, str]] = {}  # lang -> key(en) -> most frequent translation
    english: dict[str, str] = {}
    for lang, counter in pairs.items():
        by_key: dict[str, list[tuple[int, str, str]]] = collections.defaultdict(list)
        for (en, tr), c in counter.items():
            by_key[key(en)].append((-c, en, tr))
        best[lang] = {}
        for k, items in by_key.items():
            items.sort()
            best[lang][k] = items[0][2]
            english.setdefault(k, min(en for _, en, _ in items))
    pool = sorted(k for k in english if all(k in best[lang] for lang in TARGETS))
    random.Random(seed).shuffle(pool)
    valid_keys, test_keys = pool[:n_valid], pool[n_valid:n_valid + n_test]
    held = set(valid_keys) | set(test_keys)

    def rows(keys):
        return [[english[k]] + [best[lang][k] for lang in TARGETS] for k in keys]

    train = {}
    for lang in TARGETS:
        seen, items = set(), []
        for en, tr in sorted(pairs[lang]):
            if key(en) in held or (key(en), tr) in seen:
                continue
            seen.add((key(en), tr))
            items.append((en, tr))
        random.Random(f"{seed}-{lang}").shuffle(items)
        train[lang] = items
    return train, rows(valid_keys), rows(test_keys), len(pool)


def _gz(lines: Iterable[str]) -> bytes:
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0, filename="") as g:
        for line in lines:
            g.write((line + "\n").encode("utf-8"))
    return buf.getvalue()


def write_corpus(out: str, train, valid, test, pool: int, extra: dict) -> dict:
    os.makedirs(out, exist_ok=True)
    files = {f"train.en-{lang}.tsv.gz": _gz(f"{en}\t{tr}" for en, tr in items)
             for lang, items in train.items()}
    header = "\t".join(("en",) + TARGETS)
    files["valid.tsv.gz"] = _gz([header] + ["\t".join(r) for r in valid])
    files["test.tsv.gz"] = _gz([header] + ["\t".join(r) for r in test])
    for name, data in files.items():
        atomic_write(os.path.join(out, name), data)
    stats = {"train": {f"en-{lang}": len(v) for lang, v in train.items()},
             "valid": len(valid), "test": len(test), "multiway_pool": pool, **extra,
             "sha256": {n: hashlib.sha256(d).hexdigest() for n, d in sorted(files.items())}}
    atomic_write(os.path.join(out, "stats.json"), json.dumps(stats, indent=1).encode())
    return stats


def download(packages: list[str], folder: str) -> list[str]:
    """``apt-get download`` each package into ``folder`` (skips ones already there)."""
    os.makedirs(folder, exist_ok=True)
    have = os.listdir(folder)
    missing = [p for p in packages if not any(f.startswith(p + "_") for f in have)]
    if missing:
        r = subprocess.run(["apt-get", "download", *missing], cwd=folder, capture_output=True,
                           text=True)
        if r.returncode != 0:
            raise RuntimeError(f"apt-get download failed (run `apt-get update` first?):\n"
                               f"{r.stderr.strip()[-2000:]}")
    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".deb"))


def build(out: str, packages: list[str] | None = None, debs: str | None = None,
          n_valid: int = 500, n_test: int = 1000, seed: int = 20211,
          progress: bool = True) -> dict:
    packages = list(packages or PACKAGES)
    with tempfile.TemporaryDirectory() as tmp:
        deb_files = download(packages, debs or tmp)

        def catalogs():
            for deb in tqdm(deb_files, desc="catalogs", unit="deb", disable=not progress):
                yield from mo_entries_of_deb(deb)

        pairs = collect(catalogs())
    train, valid, test, pool = split(pairs, n_valid, n_test, seed)
    versions = [os.path.basename(d).split("_")[:2] for d in deb_files]
    return write_corpus(out, train, valid, test, pool,
                        {"seed": seed, "packages": [f"{n} {v}" for n, v in versions]})


def _cmd_build(args) -> int:
    pkgs = None
    if args.packages:
        with open(args.packages) as f:
            pkgs = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    stats = build(args.out, pkgs, args.debs, args.valid, args.test, args.seed)
    print(json.dumps({k: v for k, v in stats.items() if k != "sha256"}, indent=1))
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("corpus", help="corpus tools")
    csub = p.add_subparsers(dest="corpus_cmd", required=True)
    q = csub.add_parser("build", help="rebuild the corpus from Debian packages' translations")
    q.add_argument("--out", required=True)
    q.add_argument("--packages", help="file with one package per line (default: built-in list)")
    q.add_argument("--debs", help="keep/reuse downloaded .deb files in this folder")
    q.add_argument("--valid", type=int, default=500)
    q.add_argument("--test", type=int, default=1000)
    q.add_argument("--seed", type=int, default=20211)
    q.set_defaults(func=_cmd_build)
