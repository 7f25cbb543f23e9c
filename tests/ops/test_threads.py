"""The active pair is per thread (issue 20, item 6): threads running
``with active_pair(model, p): model(x)`` on one shared model with different pairs each get their
own pair's outputs, at a tiny switch interval; helper threads without a setting of their own see
set_active_pair's; MaskContext stays deepcopy- and pickle-able."""

from __future__ import annotations

import copy
import pickle
import sys
import threading

import pytest
import torch
from torch import nn

import lass_sparse as ls
from lass_sparse import MaskBank, MaskedLinear, MaskedMultiheadAttention

PAIRS = ("en-de", "en-fr", "de-en", "fr-en")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = MaskedLinear(16, 32)
        self.attn = MaskedMultiheadAttention(32, 4, batch_first=True)
        self.fc2 = MaskedLinear(32, 8)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        h = h + self.attn(h, h, h, need_weights=False)[0]
        return self.fc2(h)


def _model():
    torch.manual_seed(0)
    model = Net().eval()
    g = torch.Generator().manual_seed(0)
    names = ls.nn.masked_parameters(model)
    bank = MaskBank({n: model.get_parameter(n).shape for n in names}, alpha=0.5)
    for p in PAIRS:
        bank.add_pair(p, {n: torch.rand(model.get_parameter(n).shape, generator=g) < 0.5
                          for n in names})
    ls.attach(model, bank)
    return model


@pytest.fixture
def tiny_switch_interval():
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(old)


def _run_threads(n, target):
    errors = []

    def wrap(i):
        try:
            target(i)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=wrap, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def test_concurrent_inference_with_different_pairs_has_no_wrong_outputs(tiny_switch_interval):
    """Before: a thread's forward used another thread's mask (33 of 84,275 calls)."""
    model = _model()
    x = torch.randn(2, 3, 16)
    ids = torch.tensor([2, 0])
    with torch.no_grad():
        want = {}
        for p in PAIRS:
            with ls.active_pair(model, p):
                want[p] = model(x)
        want[None] = model(x)
        with ls.active_pair(model, list(PAIRS), pair_ids=ids):
            want["mixed"] = model(x)
    assert not torch.allclose(want["en-de"], want["en-fr"])
    settings = [*PAIRS, None, "mixed"]
    iters, wrong, calls = 150, [], [0]

    def work(i):
        for j in range(iters):
            p = settings[(i + j) % len(settings)]
            with torch.no_grad():
                if p == "mixed":
                    with ls.active_pair(model, list(PAIRS), pair_ids=ids):
                        y = model(x)
                else:
                    with ls.active_pair(model, p):
                        y = model(x)
            calls[0] += 1
            if not torch.allclose(y, want[p], atol=1e-5, rtol=1e-5):
                wrong.append((i, j, p))

    _run_threads(8, work)
    assert calls[0] == 8 * iters
    assert wrong == []
    assert model.fc1._lass_ctx.pair is None  # every scope restored


def test_set_active_pair_is_what_threads_without_their_own_setting_use(tiny_switch_interval):
    model = _model()
    x = torch.randn(2, 3, 16)
    with torch.no_grad():
        with ls.active_pair(model, "en-fr"):
            want_fr = model(x)
        ls.set_active_pair(model, "en-de")
        want_de = model(x)
    seen = {}

    def helper(i):  # e.g. a DataParallel replica's thread: never sets a pair
        with torch.no_grad():
            seen[i] = model(x)

    _run_threads(2, helper)
    for y in seen.values():
        torch.testing.assert_close(y, want_de)

    def own(i):  # a thread with its own pair leaves the others alone
        ls.set_active_pair(model, "en-fr")
        with torch.no_grad():
            seen["own"] = model(x)

    _run_threads(1, own)
    torch.testing.assert_close(seen["own"], want_fr)
    with torch.no_grad():
        torch.testing.assert_close(model(x), want_de)  # this thread keeps its own pair
    assert model.fc1._lass_ctx.pair == "en-de"


def test_a_scope_open_in_one_thread_is_seen_by_helper_threads_until_it_closes():
    """Autograd device threads and DataParallel replicas run the forward in threads that never set
    a pair: they follow the one open scope (as before), and the default once it closes."""
    model = _model()
    ctx = ls.nn.get_context(model)
    seen = []

    def helper():
        seen.append(ctx.pair)

    with ls.active_pair(model, "de-en"):
        t = threading.Thread(target=helper)
        t.start()
        t.join()
    t = threading.Thread(target=helper)
    t.start()
    t.join()
    assert seen == ["de-en", None]


def test_context_with_thread_state_deepcopies_and_pickles():
    model = _model()
    x = torch.randn(2, 3, 16)
    ls.set_active_pair(model, "fr-en")
    with torch.no_grad():
        want = model(x)
        for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
            ctx = clone.fc1._lass_ctx
            assert ctx is clone.fc2._lass_ctx is clone.attn._lass_ctx is not model.fc1._lass_ctx
            assert ctx.pair == "fr-en"
            torch.testing.assert_close(clone(x), want)
            ls.set_active_pair(clone, None)
            assert model.fc1._lass_ctx.pair == "fr-en"
            with ls.active_pair(clone, "en-de"):  # the clone's threading state works
                assert ctx.pair == "en-de"
        with ls.active_pair(model, "en-de"):
            inner = copy.deepcopy(model)  # carries the calling thread's setting
        assert inner.fc1._lass_ctx.pair == "en-de"
