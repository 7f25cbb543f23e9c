"""Segment tables are read from the device once (lass_sparse/ops/segments.py): the ops remember a
table's values per tensor and version, the nn layers build their tables on the host and register
them. Reads are counted through ``Tensor.tolist``, the one way the library reads a table; a
stale table would show as wrong results, checked against per-segment dense products."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lass_sparse as ls
from lass_sparse import MaskBank, MaskedLinear
from lass_sparse.bitmask import pack_mask_reference

# the backends that read tables through lass_sparse.ops.segments (the reference reads its own)
BACKENDS = [n for n in ("cpu", "triton") if ls.backends()[n]["active"]]


@pytest.fixture
def reads(monkeypatch):
    """The tensors whose values were read with ``tolist`` while the test ran."""
    seen: list[torch.Tensor] = []
    real = torch.Tensor.tolist

    def tolist(t):
        seen.append(t)
        return real(t)

    monkeypatch.setattr(torch.Tensor, "tolist", tolist)
    return seen


def _bank_case(t=10, n=12, k=45, p=4):
    x = torch.randn(t, k, requires_grad=True)
    w = torch.randn(n, k, requires_grad=True)
    masks = torch.rand(p, n, k) > 0.5
    return x, w, masks, pack_mask_reference(masks)


def _want(x, w, masks, table):
    """Output, dx and dW of ``sum(y²)`` for ``table`` = [(lo, hi, pair)], per segment in dense."""
    xs, ws = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    y = torch.cat([xs[a:b] @ (ws * masks[q]).T for a, b, q in table])
    y.pow(2).sum().backward()
    return y.detach(), xs.grad, ws.grad


def _run(x, w, bank, offs, pair):
    x.grad = w.grad = None
    y = ls.segmented_masked_linear(x, w, bank, offs, pair)
    y.pow(2).sum().backward()
    return y.detach(), x.grad, w.grad


def _close(got, want):
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_table_is_read_once_and_again_after_an_in_place_change(backend, reads):
    x, w, masks, bank = _bank_case()
    offs, pair = torch.tensor([0, 3, 3, 7, 10]), torch.tensor([3, 1, 0, 3])
    with ls.use_backend(backend):
        for _ in range(3):  # forward, dx and dW, three times: one read of each tensor
            _close(_run(x, w, bank, offs, pair),
                   _want(x, w, masks, [(0, 3, 3), (3, 7, 0), (7, 10, 3)]))
        assert [t is offs or t is pair for t in reads] == [True, True]
        offs[2] = 5  # in place: the version counter moves, the table is read again
        pair[3] = 2
        _close(_run(x, w, bank, offs, pair), _want(x, w, masks, [(0, 3, 3), (3, 5, 1), (5, 7, 0),
                                                                  (7, 10, 2)]))
        assert len(reads) == 4


@pytest.mark.parametrize("backend", BACKENDS)
def test_inference_mode_tables_are_never_stale(backend):
    """No version counter to tell a change: such tables are read at every call."""
    x, w, masks, bank = _bank_case()
    x, w = x.detach(), w.detach()
    first, second = (_want(x, w, masks, table)[0] for table in ([(0, 4, 1), (4, 10, 2)],
                                                                 [(0, 6, 0), (6, 10, 2)]))
    with torch.inference_mode(), ls.use_backend(backend):
        offs, pair = torch.tensor([0, 4, 10]), torch.tensor([1, 2])
        torch.testing.assert_close(ls.segmented_masked_linear(x, w, bank, offs, pair), first)
        offs[1], pair[0] = 6, 0
        torch.testing.assert_close(ls.segmented_masked_linear(x, w, bank, offs, pair), second)


def test_a_bad_table_is_refused_at_every_call_not_only_the_first():
    """The values are remembered, the checks against each call's shapes run every time."""
    x, w, _, bank = _bank_case()
    offs, pair = torch.tensor([0, 3, 10]), torch.tensor([0, 1])
    ls.segmented_masked_linear(x, w, bank, offs, pair)
    with pytest.raises(ValueError, match="from 0 to T=9"):
        ls.segmented_masked_linear(x[:9], w, bank, offs, pair)
    with pytest.raises(ValueError, match=r"in \[0, P=1\)"):
        ls.segmented_masked_linear(x, w, bank[:1], offs, pair)


@pytest.fixture
def capturing(monkeypatch):
    """Every table counts as unreadable, as on a CUDA stream under graph capture."""
    from lass_sparse.ops import segments

    monkeypatch.setattr(segments, "_capturing", lambda t: True)


@pytest.mark.parametrize("block_m", [None, 1, 2, 4, 16])
def test_tiles_built_on_the_device_equal_the_host_tiles(block_m):
    from lass_sparse.ops import segments

    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        s = int(torch.randint(1, 6, (1,), generator=gen))
        offs = torch.cat([torch.zeros(1, dtype=torch.long),
                          torch.randint(0, 9, (s,), generator=gen).cumsum(0)])
        pair = torch.randint(0, 4, (s,), generator=gen)
        x, bank = torch.empty(int(offs[-1]), 1), torch.empty(4, 1, 1)
        host = [list(map(tuple, zip(*(v.tolist() for v in segments.device_tiles(
            offs, pair, block_m, x, bank)))))]
        dev = segments._tiles_on_device(offs, pair, block_m, x.device, x.shape[0], 4)
        if block_m is not None:
            assert dev[0].numel() == -(-x.shape[0] // block_m) + s  # the static bound
        tiles = [t for t in zip(*(v.tolist() for v in dev)) if t[0] < t[1]]
        assert [tiles] == host, (offs.tolist(), pair.tolist())


@pytest.mark.skipif(not ls.backends()["triton"]["active"], reason="needs the Triton backend")
@pytest.mark.parametrize("variant", ["v1", "wt"])
def test_an_unreadable_table_is_not_read_and_gives_the_same_results(variant, capturing, reads,
                                                                     monkeypatch):
    """Under CUDA graph capture a table the host does not know is never read: its checks are
    device asserts, its tile tables are built on the device (empty segments, unsorted pairs)."""
    monkeypatch.setenv("LASS_SPARSE_TRITON_VARIANT", variant)
    x, w, masks, bank = _bank_case(t=21)
    offs, pair = torch.tensor([0, 3, 3, 12, 21]), torch.tensor([3, 1, 0, 2])
    with ls.use_backend("triton"):
        _close(_run(x, w, bank, offs, pair),
               _want(x, w, masks, [(0, 3, 3), (3, 12, 0), (12, 21, 2)]))
    assert not [t for t in reads if t is offs or t is pair]


@pytest.mark.skipif(not ls.backends()["triton"]["active"], reason="needs the Triton backend")
def test_an_unreadable_bad_table_fails_the_device_assert(capturing):
    x, w, _, bank = _bank_case()
    with ls.use_backend("triton"):
        for offs, pair in (([0, 3, 11], [0, 1]), ([0, 5, 3, 10], [0, 1, 2]), ([0, 3, 10], [0, 4])):
            with pytest.raises(RuntimeError, match=r"non-decreasing from 0 to T=10 and seg_pair "
                                                   r"ids in \[0, P=4\)"):
                ls.segmented_masked_linear(x, w, bank, torch.tensor(offs), torch.tensor(pair))


def _mixed_model(pairs=("en-de", "en-fr", "en-zh")):
    model = nn.Sequential(MaskedLinear(32, 48), nn.GELU(), MaskedLinear(48, 16))
    bank = MaskBank({n: p.shape for n, p in model.named_parameters() if n.endswith("weight")},
                    alpha=0.5)
    for p in pairs:
        bank.add_pair(p, {n: torch.rand(s) < 0.5 for n, s in bank.shapes.items()})
    ls.attach(model, bank)
    return model, bank, list(pairs)


def _per_row_want(model, bank, pairs, x, ids):
    def lin(i, h, ix):
        w = model[i].weight * ls.unpack_mask(bank.bits(pairs[ix], f"{i}.weight"), h.shape[-1])
        return F.linear(h, w, model[i].bias)

    return torch.stack([lin(2, F.gelu(lin(0, x[b], i)), i) for b, i in enumerate(ids.tolist())])


def test_a_mixed_pair_model_reads_no_table_after_its_first_batch(reads):
    model, bank, pairs = _mixed_model()
    x = torch.randn(6, 5, 32)
    ids = torch.tensor([2, 0, 2, 1, 0, 0])
    with ls.active_pair(model, pairs, pair_ids=ids):
        model(x).sum().backward()
        first = len(reads)
        for _ in range(2):
            model(x).sum().backward()
        assert first > 0 and len(reads) == first  # no reads by any layer, forward or backward
        with torch.no_grad():
            y = model(x)
    torch.testing.assert_close(y, _per_row_want(model, bank, pairs, x, ids), atol=1e-5,
                               rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_mixed_pair_model_in_inference_mode_reads_no_table_after_its_first_batch(backend,
                                                                                   reads):
    """Tables built under inference mode have no version counter: the layers register theirs."""
    model, bank, pairs = _mixed_model()
    x = torch.randn(6, 5, 32)
    ids = torch.tensor([1, 1, 0, 2, 2, 2])
    with torch.inference_mode(), ls.use_backend(backend), \
            ls.active_pair(model, pairs, pair_ids=ids):
        model(x)
        first = len(reads)
        y = model(x)
    assert len(reads) == first
    torch.testing.assert_close(y, _per_row_want(model, bank, pairs, x, ids), atol=1e-5,
                               rtol=1e-5)


def test_the_native_registry_of_known_tables():
    """``lass_sparse_cpu::remember_table`` / ``table_known`` (csrc/cpu/known_tables.cpp), which
    the CUDA entries ask before taking a segmented call without reading its table: known only
    for the registered tensors themselves (held weakly), for the rows and pair count they
    describe; invalid values refused; the oldest entries dropped beyond 512."""
    if not ls.backends()["cpu"]["active"]:
        pytest.skip("the C++ extension is not built")
    ops = torch.ops.lass_sparse_cpu
    offs, pair = torch.tensor([0, 2, 2, 5]), torch.tensor([3, 0, 1])
    assert not ops.table_known(offs, pair, 5, 4)
    ops.remember_table(offs, pair, [0, 2, 2, 5], [3, 0, 1])
    assert ops.table_known(offs, pair, 5, 4)
    assert not ops.table_known(offs, pair, 4, 4)  # x with other rows
    assert not ops.table_known(offs, pair, 5, 3)  # a bank without pair 3
    assert not ops.table_known(offs.clone(), pair, 5, 4)  # identity, not values
    assert not ops.table_known(offs, pair.clone(), 5, 4)
    with torch.no_grad():
        view = offs[:]  # another tensor object over the same storage
    assert not ops.table_known(view, pair, 5, 4)
    with pytest.raises(RuntimeError, match="seg_offsets must be non-decreasing"):
        ops.remember_table(offs, pair, [0, 3, 2, 5], [3, 0, 1])
    with pytest.raises(RuntimeError, match="seg_pair ids must be >= 0"):
        ops.remember_table(offs, pair, [0, 2, 2, 5], [3, -1, 1])
    assert ops.table_known(offs, pair, 5, 4)  # a refused call changes nothing
    # held weakly: a table allocated where a dead one lived is not known
    o2, p2 = torch.tensor([0, 1]), torch.tensor([0])
    ops.remember_table(o2, p2, [0, 1], [0])
    assert ops.table_known(o2, p2, 1, 1)
    del o2
    fresh = [torch.tensor([0, 1]) for _ in range(16)]
    assert not any(ops.table_known(f, p2, 1, 1) for f in fresh)
    # bounded: after 600 more tables the first is gone, the newest known
    many = [(torch.tensor([0, 1]), torch.tensor([0])) for _ in range(600)]
    for o, p in many:
        ops.remember_table(o, p, [0, 1], [0])
    assert not ops.table_known(offs, pair, 5, 4)
    assert ops.table_known(*many[-1], 1, 1) and not ops.table_known(*many[0], 1, 1)


# -------------------------------------------------------------------------------- on a GPU


def _gpu_case():
    """(model on the GPU, its pairs, x [6, 64, 32], pair ids of the 6 sequences)."""
    from lass_sparse.testing import require_backend

    require_backend("triton")  # the segmented ops' CUDA kernels
    model, _, pairs = _mixed_model()
    return model.cuda(), pairs, torch.randn(6, 64, 32, device="cuda"), torch.tensor(
        [2, 0, 2, 1, 0, 0])


@pytest.mark.gpu
def test_a_mixed_pair_step_on_the_gpu_syncs_only_in_its_first_batch():
    model, pairs, x, ids = _gpu_case()
    with ls.active_pair(model, pairs, pair_ids=ids):
        model(x).sum().backward()  # builds the grouping, tunes the kernels
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            model(x).sum().backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()


def _graph_step(model, x):
    """Forward and backward captured in a CUDA graph (after warm-up on a side stream, as the
    torch.cuda.graphs docs ask); returns (replay, static output)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            model.zero_grad(set_to_none=False)
            model(x).pow(2).sum().backward()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    model.zero_grad(set_to_none=False)
    with torch.cuda.graph(g):
        y = model(x)
        y.pow(2).sum().backward()
    return g, y


@pytest.mark.gpu
@pytest.mark.parametrize("mixed", [False, True])
def test_a_masked_training_step_replays_from_a_cuda_graph(mixed):
    model, pairs, x, ids = _gpu_case()
    with ls.active_pair(model, pairs if mixed else pairs[0], pair_ids=ids if mixed else None):
        g, y = _graph_step(model, x)
        x.copy_(torch.randn_like(x))  # new data into the static input, then replay
        model.zero_grad(set_to_none=False)
        g.replay()
        torch.cuda.synchronize()
        got = [y.clone()] + [p.grad.clone() for p in model.parameters()]
        model.zero_grad(set_to_none=True)
        want_y = model(x)
        want_y.pow(2).sum().backward()
    want = [want_y.detach()] + [p.grad for p in model.parameters()]
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
def test_a_masked_model_compiles_with_reduce_overhead():
    model, pairs, x, _ = _gpu_case()
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    with ls.active_pair(model, pairs[1]):
        for _ in range(3):  # warm-up runs, then graph replays
            y = compiled(x)
        torch.testing.assert_close(y, model(x), atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
def test_mixed_batches_compile_with_reduce_overhead_over_any_composition():
    """A compiled mixed-pair model under CUDA graphs: the grouping is built in the graph, the
    segmented ops read no table during capture (device tiles, device asserts), and replays with
    new pair ids (same shape) give the eager results."""
    model, pairs, x, _ = _gpu_case()
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    for ids in ([2, 0, 2, 1, 0, 0], [0, 0, 0, 0, 0, 0], [1, 2, 1, 2, 0, 1]) * 2:
        with ls.active_pair(model, pairs, pair_ids=torch.tensor(ids, device="cuda")):
            got = compiled(x).clone()
            torch.testing.assert_close(got, model(x), atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
def test_segmented_decode_calls_with_registered_tables_run_no_python(monkeypatch):
    """Mixed-pair decode rows (<= 64) whose table the nn layers built and registered: the CUDA
    entry takes every call from the dispatcher (no op body, no table read); an unregistered
    table goes through the body, which checks it and then picks the same kernel."""
    from lass_sparse.testing import record_backends, require_backend

    require_backend("cuda")
    monkeypatch.delenv("LASS_SPARSE_TRITON_VARIANT", raising=False)
    model, bank, pairs = _mixed_model()
    model = model.cuda()
    x = torch.randn(6, 2, 32, device="cuda")
    ids = torch.tensor([2, 0, 2, 1, 0, 0])
    seen = record_backends(monkeypatch)
    with torch.no_grad(), ls.active_pair(model, pairs, pair_ids=ids):
        y = model(x)
    assert seen == []
    torch.testing.assert_close(y, _per_row_want(model, bank, pairs, x, ids), atol=1e-4,
                               rtol=1e-4)
    w = torch.randn(8, 32, device="cuda")
    stack = torch.stack([pack_mask_reference(torch.rand(8, 32, device="cuda") > 0.5)
                         for _ in range(2)])
    offs, pid = torch.tensor([0, 3, 5], device="cuda"), torch.tensor([1, 0], device="cuda")
    with torch.no_grad():
        torch.ops.lass_sparse.segmented_masked_linear(x[:, 0][:5], w, stack, offs, pid, None)
    assert seen == ["cuda"]
