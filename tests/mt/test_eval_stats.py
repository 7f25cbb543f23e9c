"""Paired / pooled bootstrap (parity with sacrebleu's paired bootstrap) and the strict reader of
a user's multi-way test file."""

from __future__ import annotations

import gzip
import random

import pytest

pytest.importorskip("sacrebleu")

from sacrebleu.metrics import BLEU, CHRF  # noqa: E402
from sacrebleu.significance import PairedTest  # noqa: E402

from lass_sparse.mt.corpus import eval_pairs, load_corpus, read_test_file  # noqa: E402
from lass_sparse.mt.metrics import paired_bootstrap, pooled_bootstrap  # noqa: E402

N = 300  # resamples: enough for the statistics, light on the CPU


@pytest.fixture(scope="module")
def demo():
    return load_corpus("demo")


def degrade(refs: list[str], p: float, seed: int, chars: bool) -> list[str]:
    """A "system output": each token (a character for Chinese) dropped or replaced by another
    token of the sentence with probability ``p``."""
    rng = random.Random(seed)
    out = []
    for s in refs:
        toks = list(s) if chars else s.split()
        kept = [t if rng.random() >= p else rng.choice(toks) for t in toks
                if rng.random() >= p / 2]
        out.append(("" if chars else " ").join(kept) or toks[0])
    return out


def outputs(demo, tgt: str, p_sys: float, p_bl: float):
    refs = [r[tgt] for r in demo.test]
    return (degrade(refs, p_bl, 1, tgt == "zh"), degrade(refs, p_sys, 2, tgt == "zh"), refs)


def sacrebleu_paired_bs(bl, sy, refs, tgt, n_samples, seed, monkeypatch):
    monkeypatch.setenv("SACREBLEU_SEED", str(seed))
    metrics = {"BLEU": BLEU(tokenize="zh" if tgt == "zh" else "13a"), "chrF": CHRF()}
    _, scores = PairedTest([("baseline", bl), ("system", sy)], metrics, [refs],
                           test_type="bs", n_samples=n_samples)()
    return {"bleu": scores["BLEU"], "chrf": scores["chrF2"]}


@pytest.mark.parametrize("tgt", ["de", "zh"])
@pytest.mark.parametrize("p_sys,p_bl", [(0.22, 0.2), (0.15, 0.35)])
def test_paired_bootstrap_equals_sacrebleu(demo, monkeypatch, tgt, p_sys, p_bl):
    bl, sy, refs = outputs(demo, tgt, p_sys, p_bl)
    seed = 4321
    ours = paired_bootstrap(bl, sy, refs, tgt, n_samples=N, seed=seed)
    theirs = sacrebleu_paired_bs(bl, sy, refs, tgt, N, seed, monkeypatch)
    assert ours["n"] == len(refs) and ours["n_samples"] == N
    for m in ("bleu", "chrf"):
        b, s = theirs[m]
        o = ours[m]
        # the same resamples and arithmetic: equal, not merely close
        assert (o["baseline"], o["system"], o["p_value"]) == (b.score, s.score, s.p_value)
        assert (o["system_mean"], o["system_ci"]) == (s.mean, s.ci)
        assert (o["baseline_mean"], o["baseline_ci"]) == (b.mean, b.ci)
        assert o["delta"] == pytest.approx(s.score - b.score)
        lo, hi = o["ci95"]
        assert 0.5 * (hi - lo) == pytest.approx(s.ci) and lo <= o["system_mean"] <= hi
        assert o["delta_ci95"][0] <= o["delta_ci95"][1]
    if p_bl - p_sys > 0.1:  # clearly better system
        assert ours["bleu"]["delta"] > 0 and ours["bleu"]["p_value"] < 0.01
        assert ours["bleu"]["delta_ci95"][0] > 0


@pytest.mark.parametrize("tgt", ["de", "zh"])
def test_close_systems_are_not_significant(demo, tgt):
    # so that the parity test above also covers intermediate p-values, not only the smallest
    r = paired_bootstrap(*outputs(demo, tgt, 0.22, 0.2), tgt, n_samples=N)
    for m in ("bleu", "chrf"):
        assert 0.05 < r[m]["p_value"] < 0.9
        assert r[m]["delta_ci95"][0] < 0 < r[m]["delta_ci95"][1]


def test_identical_systems(demo, monkeypatch):
    _, sy, refs = outputs(demo, "fr", 0.2, 0.2)
    r = paired_bootstrap(sy, sy, refs, "fr", n_samples=N)
    for m in ("bleu", "chrf"):
        assert r[m]["delta"] == 0 and r[m]["p_value"] == 1.0
        assert r[m]["delta_ci95"] == [0.0, 0.0]
    # the one deliberate deviation: sacrebleu reports its smallest p-value here
    theirs = sacrebleu_paired_bs(sy, sy, refs, "fr", N, 12345, monkeypatch)
    assert theirs["bleu"][1].p_value == pytest.approx(1 / (N + 1))


def test_worse_system_is_significant_with_negative_delta(demo):
    good, bad, refs = outputs(demo, "es", 0.4, 0.1)
    r = paired_bootstrap(good, bad, refs, "es", n_samples=N)
    assert r["bleu"]["delta"] < 0 and r["bleu"]["p_value"] < 0.01
    assert r["bleu"]["delta_ci95"][1] < 0


def test_seed_makes_it_deterministic(demo):
    bl, sy, refs = outputs(demo, "de", 0.2, 0.25)
    a = paired_bootstrap(bl, sy, refs, "de", n_samples=50, seed=3)
    assert a == paired_bootstrap(bl, sy, refs, "de", n_samples=50, seed=3)
    assert a["bleu"]["system_mean"] != paired_bootstrap(bl, sy, refs, "de", n_samples=50,
                                                        seed=4)["bleu"]["system_mean"]


def test_pooled_single_direction_equals_paired(demo):
    bl, sy, refs = outputs(demo, "zh", 0.2, 0.25)
    one = pooled_bootstrap({"en-zh": (bl, sy, refs, "zh")}, n_samples=N, seed=11)
    single = paired_bootstrap(bl, sy, refs, "zh", n_samples=N, seed=11)
    assert one["bleu"] == single["bleu"] and one["chrf"] == single["chrf"]
    assert one["directions"] == {"en-zh": len(refs)} and one["n"] == len(refs)


def test_pooled_two_directions(demo):
    de = outputs(demo, "de", 0.15, 0.35) + ("de",)
    zh = outputs(demo, "zh", 0.15, 0.35) + ("zh",)
    r = pooled_bootstrap({"en-zh": zh, "en-de": de}, n_samples=N)
    per = [paired_bootstrap(*x, n_samples=N) for x in (de, zh)]
    for m in ("bleu", "chrf"):
        assert r[m]["baseline"] == pytest.approx(sum(p[m]["baseline"] for p in per) / 2)
        assert r[m]["system"] == pytest.approx(sum(p[m]["system"] for p in per) / 2)
        assert r[m]["delta"] > 0 and r[m]["p_value"] < 0.01
    assert r["n"] == 2 * len(demo.test)
    # independent of the dict's order
    assert pooled_bootstrap({"en-de": de, "en-zh": zh}, n_samples=N) == r
    same = pooled_bootstrap({"en-de": (de[1], de[1], de[2], "de"),
                             "en-zh": (zh[1], zh[1], zh[2], "zh")}, n_samples=N)
    for m in ("bleu", "chrf"):
        assert same[m]["delta"] == 0 and same[m]["p_value"] == 1.0


def test_bootstrap_input_validation():
    refs = ["a b c", "d e f"]
    with pytest.raises(ValueError, match="system_hyps has 1 lines but refs has 2"):
        paired_bootstrap(refs, refs[:1], refs, "de")
    with pytest.raises(ValueError, match="baseline_hyps has 3 lines"):
        paired_bootstrap(refs + ["x"], refs, refs, "de")
    with pytest.raises(ValueError, match="refs is empty"):
        paired_bootstrap([], [], [], "de")
    for bad in (0, -5, 2.5, True):
        with pytest.raises(ValueError, match="n_samples"):
            paired_bootstrap(refs, refs, refs, "de", n_samples=bad)
    with pytest.raises(ValueError, match="per_direction is empty"):
        pooled_bootstrap({})
    with pytest.raises(ValueError, match=r"system_hyps of per_direction\['en-de'\]"):
        pooled_bootstrap({"en-de": (refs, refs[:1], refs, "de")})
    with pytest.raises(ValueError, match=r"per_direction\['en-de'\] must be"):
        pooled_bootstrap({"en-de": (refs, refs, refs)})
    with pytest.raises(ValueError, match="n_samples"):
        pooled_bootstrap({"en-de": (refs, refs, refs, "de")}, n_samples=0)


# --- read_test_file / eval_pairs ------------------------------------------------------------

ROWS = [{"en": "Open the file", "de": "Datei öffnen", "zh": "打开文件"},
        {"en": "Save all", "de": "Alle speichern", "zh": "全部保存"}]


def write(path, text: str | bytes, gz: bool | None = None) -> str:
    data = text.encode() if isinstance(text, str) else text
    gz = str(path).endswith(".gz") if gz is None else gz
    with (gzip.open(path, "wb") if gz else open(path, "wb")) as f:
        f.write(data)
    return str(path)


GOOD = "en\tde\tzh\n" + "".join(f"{r['en']}\t{r['de']}\t{r['zh']}\n" for r in ROWS)


@pytest.mark.parametrize("name", ["t.tsv", "t.tsv.gz"])
def test_read_test_file_round_trip(tmp_path, name):
    assert read_test_file(write(tmp_path / name, GOOD)) == ROWS
    # CRLF line ends, a byte-order mark and no final newline are accepted
    crlf = "\ufeff" + GOOD.replace("\n", "\r\n").rstrip("\r\n")
    assert read_test_file(write(tmp_path / name, crlf)) == ROWS


@pytest.mark.parametrize("text,line,what", [
    (GOOD + "Quit\tBeenden\n", 4, "expected 3 tab-separated fields"),
    (GOOD.replace("Save all", " "), 3, "empty en field"),
    (GOOD + "\n", 4, "got 1"),
    ("en\tDE\tzh\n" + GOOD.split("\n", 1)[1], 1, "header field 2 is 'DE'"),
    ("en\tde\ten\n" + GOOD.split("\n", 1)[1], 1, "duplicate language"),
    ("english\tde\n", 1, "2-3 lowercase letters"),
    ("en\nOpen\n", 1, "at least 2"),
])
@pytest.mark.parametrize("name", ["t.tsv", "t.tsv.gz"])
def test_read_test_file_malformed_lines(tmp_path, name, text, line, what):
    path = write(tmp_path / name, text)
    with pytest.raises(ValueError, match=rf"{path}:{line}: .*{what}"):
        read_test_file(path)


def test_read_test_file_bad_files(tmp_path):
    bad_utf8 = GOOD.encode() + b"Quit\tBeend\xffen\tx\n"
    for name in ("u.tsv", "u.tsv.gz"):
        path = write(tmp_path / name, bad_utf8)
        with pytest.raises(ValueError, match=rf"{path}:4: not valid UTF-8"):
            read_test_file(path)
    for name in ("e.tsv", "e.tsv.gz"):
        path = write(tmp_path / name, "")
        with pytest.raises(ValueError, match=rf"{path}: empty file"):
            read_test_file(path)
        path = write(tmp_path / ("h" + name), "en\tde\n")
        with pytest.raises(ValueError, match=rf"{path}: no rows"):
            read_test_file(path)
    path = write(tmp_path / "plain.tsv.gz", GOOD, gz=False)
    with pytest.raises(ValueError, match=rf"{path}: named .gz but is not gzip"):
        read_test_file(path)
    path = write(tmp_path / "packed.tsv", GOOD, gz=True)
    with pytest.raises(ValueError, match=rf"{path}: is gzip-compressed"):
        read_test_file(path)
    full = gzip.compress(GOOD.encode() * 50)
    path = write(tmp_path / "cut.tsv.gz", full[: len(full) // 2], gz=False)
    with pytest.raises(ValueError, match="corrupt or truncated gzip"):
        read_test_file(path)
    with pytest.raises(FileNotFoundError, match="missing.tsv"):
        read_test_file(str(tmp_path / "missing.tsv"))


def test_eval_pairs_matches_corpus_eval_set(demo):
    for split, rows in (("valid", demo.valid), ("test", demo.test)):
        for d in ("en-de", "zh-en", "fr-ar", "ru-pt"):
            for limit in (None, 7):
                assert eval_pairs(rows, d, limit) == demo.eval_set(split, d, limit)
    assert eval_pairs(ROWS, "zh-de") == (["打开文件", "全部保存"],
                                         ["Datei öffnen", "Alle speichern"])
    with pytest.raises(KeyError, match=r"test set has no en/ja column \(has \['de', 'en'"):
        eval_pairs(ROWS, "en-ja")
    with pytest.raises(KeyError, match="valid set has no en/ja column"):
        demo.eval_set("valid", "en-ja")
    with pytest.raises(ValueError, match="not a translation direction"):
        eval_pairs(ROWS, "en-en")
