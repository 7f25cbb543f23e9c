"""Beam search over batches that mix pairs (what the server runs): every row equals offline
``translate`` of its own pair, token for token; per-row BOS and step limits; arguments checked.
Runs in-process on the published models (no server)."""

from __future__ import annotations

import os
import random

import pytest
import torch

pytest.importorskip("sentencepiece")

from lass_sparse.lass.encoding import encode_source, encoder_lang, pad_batch  # noqa: E402
from lass_sparse.lass.translate import (  # noqa: E402
    beam_search,
    default_limit,
    ensure_pair,
    translate,
    translate_limits,
)
from lass_sparse.nn import active_pair, attach  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RUN = os.path.join(REPO, "results", "models")
pytestmark = pytest.mark.skipif(not os.path.exists(os.path.join(RUN, "run.json")),
                                reason="results/models (the published models) not present")
PAIRS = ["en-de", "de-en", "en-fr", "fr-en", "en-zh", "zh-en", "de-fr", "fr-zh", "zh-de"]
TEXTS = ["Open the file", "The window cannot be closed.", "Save changes before closing?",
         "Print", "No network connection was found on this computer, try again later."]


@pytest.fixture(scope="module")
def published():
    from lass_sparse.lass.pipeline import load_bank, open_run

    run = open_run(RUN, "cpu")
    model = run.load_model("lass")
    bank = load_bank(run, "masks.safetensors")
    for p in PAIRS:
        ensure_pair(bank, p)
    attach(model, bank)
    return run, model, bank


def _rows(run, model, pairs):
    rows = []
    for p in pairs:
        lang = encoder_lang(p, run.langtok)
        ids = [encode_source(run.tok, x, lang, model.config.max_len)
               for x in run.tok.encode(TEXTS)]
        for i, (x, lim) in enumerate(zip(ids, translate_limits([len(x) for x in ids],
                                                               model.config.max_len))):
            rows.append((p, i, x, lim))
    random.Random(0).shuffle(rows)
    return rows


@pytest.mark.parametrize("beam", [1, 4])
def test_mixed_pair_batch_equals_offline_translate(published, beam):
    run, model, _ = published
    want = {}
    for p in PAIRS:
        with active_pair(model, p):
            want[p] = translate(model, run.tok, TEXTS, p, beam=beam, langtok=run.langtok)
    rows = _rows(run, model, PAIRS)
    ids = torch.tensor([PAIRS.index(r[0]) for r in rows])
    hyps = beam_search(model, pad_batch([r[2] for r in rows]),
                       [run.tok.lang_id(r[0].split("-")[1]) for r in rows], beam,
                       max_len=[r[3] for r in rows], pairs=PAIRS, pair_ids=ids)
    got = run.tok.decode(hyps)
    assert [g for g in got] == [want[r[0]][r[1]] for r in rows]
    # the rows really used their own masks: the outputs differ across target languages
    assert len({want[p][0] for p in PAIRS}) > 3


def test_a_rows_result_does_not_depend_on_its_batch(published):
    """Row limits decouple rows: one sentence alone, or next to a much longer one (whose
    padded length would give a larger batch-wide limit), decodes the same."""
    run, model, _ = published
    short = encode_source(run.tok, run.tok.encode(["Print"])[0], "en", model.config.max_len)
    long = encode_source(run.tok, run.tok.encode([TEXTS[-1] * 3])[0], "en",
                         model.config.max_len)
    bos = run.tok.lang_id("de")
    lim = default_limit(model.config.max_len, len(short))
    with active_pair(model, "en-de"):
        alone = beam_search(model, pad_batch([short]), bos, 4, max_len=lim)
        both = beam_search(model, pad_batch([short, long]), bos, 4,
                           max_len=[lim, default_limit(model.config.max_len, len(long))])
    assert both[0] == alone[0]
    with active_pair(model, "en-de"):
        capped = beam_search(model, pad_batch([short, long]), bos, 2, max_len=[3, 1])
    assert len(capped[0]) <= 2 and capped[1] == []  # at the last step only EOS


def test_on_done_reports_each_row_once_when_final(published):
    run, model, _ = published
    rows = _rows(run, model, PAIRS[:4])
    ids = torch.tensor([PAIRS.index(r[0]) for r in rows])
    calls: list[tuple[int, list[int]]] = []
    hyps = beam_search(model, pad_batch([r[2] for r in rows]),
                       [run.tok.lang_id(r[0].split("-")[1]) for r in rows], 3,
                       max_len=[r[3] for r in rows], pairs=PAIRS, pair_ids=ids,
                       on_done=lambda b, h: calls.append((b, h)))
    assert sorted(b for b, _ in calls) == list(range(len(rows)))
    assert all(hyps[b] == h for b, h in calls)
    # rows leave as they finish: the call order follows the hypotheses' lengths, roughly
    lens = [len(h) for _, h in calls]
    assert lens[0] <= lens[-1] and len(set(lens)) > 1


def test_translate_limits_follow_offline_batches():
    assert translate_limits([5, 50, 7], 128, batch_size=64) == [110, 110, 110]
    assert translate_limits([5, 50, 7], 128, batch_size=2) == [24, 110, 24]  # sorted: 5,7 | 50
    assert default_limit(30, 50) == 29


def test_beam_search_checks_its_arguments(published):
    run, model, _ = published
    src = pad_batch([[5, 6, 3], [7, 3]])
    with pytest.raises(ValueError, match="pairs and pair_ids go together"):
        beam_search(model, src, 4, 1, pairs=["en-de"])
    with pytest.raises(ValueError, match="one id per source row"):
        beam_search(model, src, 4, 1, pairs=["en-de"], pair_ids=torch.tensor([0]))
    with pytest.raises(ValueError, match="bos must be an int or one value per source row"):
        beam_search(model, src, [4, 5, 6], 1)
    with pytest.raises(ValueError, match=r"max_len must be in \[1, 128\]"):
        beam_search(model, src, 4, 1, max_len=[0, 3])
