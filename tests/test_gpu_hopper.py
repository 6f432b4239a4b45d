"""The Hopper kernels (Gluon, sm_90; the forward and the dK/dV kernel): where they apply, that they compute
what the general kernels and the float64 reference compute. Runs on the GPU machine (pytest -m gpu);
skipped elsewhere."""

import math

import pytest
import torch

import mpt_attention as M
from mpt_attention.impl.triton import hopper, hopper_dkdv, key_padding, reach
from mpt_attention.kept import kept_values
from mpt_attention.testing import (
    AttnCase, assert_close_to_reference, assert_gradients_close_to_reference, capture_cuda_graph, make_inputs,
    make_varlen_inputs, profile_kernels, reference_attention, reference_attention_varlen,
)

_SM90 = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not _SM90, reason="needs an sm_90 (Hopper) GPU")]

CASES = [
    AttnCase(2, 1024, 1024, 8, 2, 128, causal=True, alibi=True),
    AttnCase(3, 137, 137, 4, 4, 64, causal=True, alibi=True),
    AttnCase(2, 197, 197, 4, 1, 128, alibi=True),  # non-causal: symmetric ALiBi, MQA
    AttnCase(2, 211, 300, 6, 3, 64, causal=True, alibi=True),  # chunked prefill, a partial last tile
    AttnCase(1, 1000, 1000, 4, 4, 128),  # no bias, non-causal, ragged last key block
    AttnCase(2, 257, 257, 4, 2, 128, causal=True),  # no bias, causal
    AttnCase(2, 128, 4097, 8, 2, 128, causal=True, alibi=True),  # one tile of queries against a long cache
    AttnCase(1, 4096, 4096, 8, 8, 64, causal=True, alibi=True),
    # D64's 192-row tiles: each consumer's own last block and first masked one, S_k - S_q not a block multiple
    AttnCase(2, 600, 1100, 4, 1, 64, causal=True),
    AttnCase(1, 1000, 384, 4, 2, 64),  # no bias, non-causal, more queries than keys: three consumers
    AttnCase(2, 1024, 1024, 8, 2, 80, causal=True, alibi=True),  # replit-code's head dim: 64 + 16 columns
    AttnCase(2, 211, 300, 4, 4, 96, causal=True, alibi=True),  # 64 + 32 columns, chunked prefill
    # symmetric ALiBi on key blocks wholly before, across and after each warpgroup's rows
    AttnCase(1, 1000, 1000, 4, 2, 64, alibi=True),
    AttnCase(2, 640, 1000, 4, 4, 128, alibi=True),  # fewer queries than keys: positions shifted by S_k - S_q
    AttnCase(1, 1000, 384, 4, 4, 64, alibi=True),  # more queries than keys: a negative shift
]


def _assert_forward_matches_reference(q, k, v, **kw):
    """Output against the float64 reference within twice the error of the same math in q's dtype; the
    log-sum-exp within 1e-3."""
    out, lse = M.attention(q, k, v, backend="triton", return_lse=True, **kw)
    ref, ref_lse = reference_attention(q.double(), k.double(), v.double(), **kw)
    low, _ = reference_attention(q, k, v, compute_dtype=q.dtype, **kw)
    assert_close_to_reference("out", out, ref, low)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=0, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id())
def test_hopper_forward_matches_float64_reference(case, dtype):
    (q, k, v), kw = make_inputs(case, dtype=dtype, device="cuda")
    assert hopper.unsupported(q, k, v, None, None, None, None, 0.0, case.causal, False) is None
    _assert_forward_matches_reference(q, k, v, **kw)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "non-causal"])
@pytest.mark.parametrize("step", [3.0, 7.9, 8.1, 40.0], ids=lambda x: f"rise-{x}-per-block")
@pytest.mark.parametrize("head_dim", [64, 128, 96])
def test_hopper_forward_rows_whose_maximum_rises_block_after_block(head_dim, step, causal, dtype):
    """The online softmax where the row maximum keeps rising: a third of the query rows (a pattern that mixes rows
    that rise and rows that do not inside every warp and every thread's pair of rows) read a ramp over the keys that
    raises their maximum by ``step`` log2 units per 128-key block, up to 320 over the row, so each block rescales
    the accumulator of some rows and not others; against float64, fp16 included. (Session 57's lazy rescaling, which
    moves a row's reference only past 8 log2 units, passed these too: 3 and 7.9 stay under that threshold, 8.1 and
    40 cross it every block.)"""
    gen = torch.Generator().manual_seed(11)
    n, n_heads = 1024, 2
    q, k, v = (torch.randn(1, n, n_heads, head_dim, generator=gen) for _ in range(3))
    ramp = step * math.log(2) * math.sqrt(head_dim) / 128 * torch.arange(n, dtype=torch.float32)
    k[..., 0] = ramp[None, :, None]
    q[..., 0] = (torch.arange(n) % 3 == 0).float()[None, :, None]
    q, k, v = (t.to(device="cuda", dtype=dtype) for t in (q, k, v))
    assert hopper.unsupported(q, k, v, None, None, None, None, 0.0, causal, False) is None
    _assert_forward_matches_reference(q, k, v, causal=causal)


@pytest.mark.parametrize("head_dim,n_kv,causal,alibi,dtype", [
    pytest.param(128, 2, True, True, torch.bfloat16, id="D128-GQA-causal-alibi"),
    pytest.param(64, 4, False, True, torch.float16, id="D64-non-causal-symmetric-alibi-fp16"),
    pytest.param(96, 1, True, False, torch.bfloat16, id="D96-MQA-causal"),
    pytest.param(112, 4, False, False, torch.bfloat16, id="D112-non-causal"),
])
def test_hopper_forward_runs_packed_sequences(head_dim, n_kv, causal, alibi, dtype):
    """attention_varlen's forward on the Hopper kernel: more tiles than SMs over 48 sequences (empty ones, one
    query row, a tile and one row, more queries than keys: causal rows without keys, queries without any key),
    each against the float64 reference on its own, the log-sum-exp too. Every packed row is compared, so a row
    that another sequence's tile overwrote (the last tile's rows past its sequence) or that no tile wrote fails."""
    gen = torch.Generator().manual_seed(5)
    lens_q = [0, 1, 1000, 64, 129, 300, 700, 128] + torch.randint(0, 600, (40,), generator=gen).tolist()
    lens_k = [40, 1, 1000, 63, 0, 300, 900, 128] + [n + int(e) for n, e in
                                                     zip(lens_q[8:], torch.randint(0, 200, (40,), generator=gen))]
    n_heads = 8
    q, k, v, cu_q, cu_k = make_varlen_inputs(lens_q, lens_k, n_heads, n_kv, head_dim, dtype=dtype, device="cuda",
                                             seed=7)
    assert hopper.unsupported(q, k, v, None, None, None, None, 0.0, causal, True, max_q=max(lens_q)) is None
    slopes = M.gen_slopes(n_heads, return_1d=True, device="cuda") if alibi else None
    out, lse = M.attention_varlen(q, k, v, cu_q, cu_k, backend="triton", causal=causal, alibi_slopes=slopes,
                                  return_lse=True)
    ref, ref_lse = reference_attention_varlen(q.double(), k.double(), v.double(), cu_q, cu_k, causal=causal,
                                              alibi_slopes=slopes)
    low, _ = reference_attention_varlen(q, k, v, cu_q, cu_k, causal=causal, alibi_slopes=slopes, compute_dtype=dtype)
    assert_close_to_reference("out", out, ref, low)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=0, atol=1e-3)
    no_keys = slice(int(cu_q[4]), int(cu_q[5]))  # 129 queries, no key: zeros and -inf
    assert (out[no_keys] == 0).all() and (lse[:, no_keys] == float("-inf")).all()


@pytest.mark.parametrize("head_dim,n_kv,causal,alibi", [
    pytest.param(128, 2, True, True, id="D128-GQA-causal-alibi-consumers-form-dQ"),
    pytest.param(64, 4, False, True, id="D64-non-causal-symmetric-alibi-dQ-warpgroup"),
    pytest.param(96, 1, True, False, id="D96-MQA-causal-tail"),
])
def test_hopper_backward_runs_packed_sequences(head_dim, n_kv, causal, alibi, hopper_dkdv_launches):
    """attention_varlen's default backward on the Hopper dK/dV kernel (dQ summed in it): the sequences of the
    forward test above (keys past a sequence are its neighbour's in the same boxes and must stay out of its dQ;
    dK and dV rows of a sequence without queries are zeros), every gradient against float64."""
    gen = torch.Generator().manual_seed(6)
    lens_q = [0, 1, 700, 64, 129, 300, 128] + torch.randint(0, 400, (20,), generator=gen).tolist()
    lens_k = [40, 1, 900, 63, 1, 300, 128] + [n + int(e) for n, e in
                                              zip(lens_q[7:], torch.randint(0, 150, (20,), generator=gen))]
    n_heads = 8
    q, k, v, cu_q, cu_k = make_varlen_inputs(lens_q, lens_k, n_heads, n_kv, head_dim, dtype=torch.bfloat16,
                                             device="cuda", seed=8, requires_grad=True)
    dout = torch.randn(q.shape, device="cuda", dtype=torch.bfloat16)
    slopes = M.gen_slopes(n_heads, return_1d=True, device="cuda") if alibi else None
    out = M.attention_varlen(q, k, v, cu_q, cu_k, backend="triton", causal=causal, alibi_slopes=slopes)
    grads = torch.autograd.grad(out, [q, k, v], dout)
    assert [call[1] for call in hopper_dkdv_launches] == [True]  # one launch, with the dQ sums
    ins = [x.detach() for x in (q, k, v)]
    ref_in = [x.double().requires_grad_() for x in ins]
    low_in = [x.clone().requires_grad_() for x in ins]
    ref, _ = reference_attention_varlen(*ref_in, cu_q, cu_k, causal=causal, alibi_slopes=slopes)
    low, _ = reference_attention_varlen(*low_in, cu_q, cu_k, causal=causal, alibi_slopes=slopes,
                                        compute_dtype=torch.bfloat16)
    assert_close_to_reference("out", out, ref, low)
    ref_g = torch.autograd.grad(ref, ref_in, dout.double())
    low_g = torch.autograd.grad(low, low_in, dout)
    for name, g, r, lo in zip(("dq", "dk", "dv"), grads, ref_g, low_g):
        assert_close_to_reference(name, g, r, lo)


@pytest.mark.parametrize("head_dim,n_kv,causal,alibi", [
    pytest.param(128, 2, True, "heads", id="D128-GQA-causal-alibi"),
    pytest.param(64, 4, True, "batch", id="D64-causal-alibi-per-batch-row"),
    pytest.param(128, 4, False, "heads", id="D128-non-causal-symmetric-alibi"),
])
def test_sequence_id_rows_run_as_packed_sequences_on_the_hopper_kernels(head_dim, n_kv, causal, alibi,
                                                                       hopper_dkdv_launches, monkeypatch):
    """attention(sequence_id=...) with sorted ids (MPT's packed rows) goes to the Hopper kernels as packed
    sequences (``packed_rows``: the default where the Hopper forward applies), and gives what the float64
    reference gives with the ids as a mask: output, log-sum-exp (MPT's causal ALiBi is relative to the row's
    last key, the packed kernels' to the run's) and every gradient."""
    from mpt_attention import ops

    seen, real = [], ops.triton_attention
    monkeypatch.setattr(ops, "triton_attention", lambda *a, **kw: seen.append(kw) or real(*a, **kw))
    seq, n_heads = 1000, 4
    ids = torch.tensor([[0] * 300 + [1] * 1 + [2] * 571 + [3] * 128, [0] * 999 + [1]], device="cuda")
    (q, k, v), _ = make_inputs(AttnCase(2, seq, seq, n_heads, n_kv, head_dim), dtype=torch.bfloat16, device="cuda",
                               requires_grad=True)
    slopes = M.gen_slopes(n_heads, return_1d=True, device="cuda")
    if alibi == "batch":
        slopes = torch.stack([slopes, M.gen_slopes(n_heads, alibi_bias_max=4, return_1d=True, device="cuda")])
    kw = dict(causal=causal, alibi_slopes=slopes, sequence_id=ids)
    out, lse = M.attention(q, k, v, backend="triton", return_lse=True, **kw)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, [q, k, v], dout)
    assert [c.get("cu_seqlens_q") is not None for c in seen] == [True]
    assert [call[1] for call in hopper_dkdv_launches] == [True]
    ref, ref_lse = reference_attention(q.double(), k.double(), v.double(), **kw)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=0, atol=1e-3)
    assert_gradients_close_to_reference(out, grads, [q, k, v], kw, dout, torch.bfloat16)


def test_sequence_id_runs_are_read_with_one_device_sync():
    """``packed_rows`` reads a ``sequence_id`` tensor's runs with one device sync (a new batch per training step
    costs one), then none while the tensor is unchanged; ids that decrease somewhere are refused with that one too."""
    import warnings

    from mpt_attention import packed_rows

    def syncs(fn):
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as seen:
                warnings.simplefilter("always")
                result = fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        return result, sum("synchronizing" in str(w.message) for w in seen)

    ids = torch.tensor([[0] * 3 + [1] * 5, [4] * 2 + [9] * 6], device="cuda")
    runs, n = syncs(lambda: packed_rows._runs(ids))
    assert n == 1 and runs[0].tolist() == [0, 3, 8, 10, 16] and runs[1] == 6
    assert runs[2].tolist() == [0, 0, 1, 1]
    assert runs[3].tolist() == [[-5] * 3 + [0] * 5, [-6] * 2 + [0] * 6]
    _, n = syncs(lambda: packed_rows._runs(ids))
    assert n == 0
    decreasing = torch.tensor([[0, 1, 0, 2]], device="cuda")  # (made outside: its copy to the device counts too)
    refused, n = syncs(lambda: packed_rows._runs(decreasing))
    assert refused is None and n == 1


def test_hopper_packed_tiles_follow_cu_seqlens_updated_in_place():
    """The per-sequence tile counts are kept on the ``cu_seqlens`` tensor between calls (``hopper.packed_tiles``):
    new lengths written into the same tensor must be seen, eagerly and by a CUDA graph captured after the counts
    were kept (serving loops update lengths in place and replay)."""
    n_heads, head_dim = 4, 128
    q, k, v, cu, _ = make_varlen_inputs([300, 200, 500], [300, 200, 500], n_heads, n_heads, head_dim,
                                        dtype=torch.bfloat16, device="cuda", seed=9)
    slopes = M.gen_slopes(n_heads, return_1d=True, device="cuda")

    def run():
        return M.attention_varlen(q, k, v, cu, cu, 1000, 1000, backend="triton", causal=True, alibi_slopes=slopes)

    run()  # the counts of [300, 200, 500] kept on cu
    graph, out = capture_cuda_graph(run)
    for lengths in ([100, 700, 200], [1000, 0, 0]):
        cu.copy_(torch.tensor([0] + lengths, device="cuda").cumsum(0))
        eager = run()
        graph.replay()
        ref, _ = reference_attention_varlen(q.double(), k.double(), v.double(), cu, cu, causal=True,
                                            alibi_slopes=slopes)
        low, _ = reference_attention_varlen(q, k, v, cu, cu, causal=True, alibi_slopes=slopes,
                                            compute_dtype=torch.bfloat16)
        assert_close_to_reference(f"eager {lengths}", eager, ref, low)
        assert_close_to_reference(f"graph replay {lengths}", out, ref, low)


SCALE_CASES = [  # softmax scales the other forward tests never use, with and without a score term
    AttnCase(2, 211, 300, 4, 2, 64, causal=True),  # masked blocks: the diagonal and a partial last key block
    AttnCase(1, 333, 333, 4, 4, 128),  # non-causal, a ragged last key block
    AttnCase(2, 257, 257, 4, 4, 80, causal=True),  # 64 + 16 columns
    AttnCase(2, 211, 300, 4, 4, 64, causal=True, alibi=True),  # ALiBi: the scale leaves the slopes' term alone
]


@pytest.mark.parametrize("scale", [0.0, -0.3, 0.02], ids=["scale-0", "negative-scale", "scale-0.02"])
@pytest.mark.parametrize("case", SCALE_CASES, ids=lambda c: c.id())
def test_hopper_forward_softmax_scale_sign_and_zero(case, scale):
    """A softmax scale of 0 (every visible key weighs the same), a negative one (the row's smallest product is
    its largest score) and a small one, through the Hopper forward against float64: masked keys (causal, past
    the last key) must stay out at scale 0, and a kernel that took the row maximum of the unscaled products
    (FA3's form, tried in benchmarks/NOTES.md session 26) must take the minimum for a negative scale."""
    (q, k, v), kw = make_inputs(case, dtype=torch.bfloat16, device="cuda")
    assert hopper.unsupported(q, k, v, None, None, None, None, 0.0, case.causal, False) is None
    _assert_forward_matches_reference(q, k, v, softmax_scale=scale, **kw)


@pytest.mark.parametrize("case", [c for c in CASES if c.head_dim == 128], ids=lambda c: c.id())
def test_hopper_backward_matches_float64_reference(case):
    """dK, dV from the Hopper dK/dV kernel (dQ from the general one) against float64; D=128, the head dim
    the deterministic backward dispatches it for."""
    (q, k, v), kw = make_inputs(case, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    dout = torch.randn(q.shape, device="cuda", dtype=torch.bfloat16)
    assert hopper.unsupported(q, k, v, None, None, None, None, 0.0, case.causal, False, dout) is None
    out = M.attention(q, k, v, backend="triton", deterministic=True, **kw)
    grads = torch.autograd.grad(out, [q, k, v], dout)
    assert_gradients_close_to_reference(out, grads, [q, k, v], kw, dout, torch.bfloat16)


FUSED_DQ_CASES = [  # deterministic=False: dQ formed in the dK/dV kernel (D128: its consumers; D64: its dQ warpgroup)
    AttnCase(2, 1024, 1024, 8, 8, 128, causal=True, alibi=True),
    AttnCase(2, 1024, 1024, 8, 2, 128, causal=True, alibi=True),  # groups of 4: two programs per group
    AttnCase(2, 197, 197, 4, 1, 128, alibi=True),  # MQA, non-causal
    AttnCase(2, 211, 300, 6, 3, 64, causal=True, alibi=True),  # groups of 2: one program per group
    AttnCase(1, 2048, 2048, 8, 1, 64, causal=True, alibi=True),  # MQA, four programs per group
    AttnCase(3, 137, 137, 4, 4, 64, causal=True, alibi=True),
    AttnCase(2, 197, 197, 4, 4, 128, alibi=True),  # non-causal: symmetric ALiBi
    AttnCase(2, 211, 300, 6, 6, 64, causal=True, alibi=True),  # chunked prefill, a partial last tile
    AttnCase(1, 1000, 1000, 4, 4, 128),  # no bias, non-causal, ragged last key block
    AttnCase(2, 257, 257, 4, 4, 64, causal=True),  # no bias, causal
    AttnCase(2, 128, 4097, 8, 8, 128, causal=True, alibi=True),  # one tile of queries against a long cache
    AttnCase(1, 2048, 2048, 8, 8, 64, causal=True, alibi=True),
    # symmetric ALiBi on query steps wholly before, across and after each warpgroup's keys
    AttnCase(1, 1000, 1000, 4, 2, 64, alibi=True),
    AttnCase(2, 640, 1000, 4, 4, 128, alibi=True),  # fewer queries than keys
    AttnCase(1, 1000, 384, 4, 4, 128, alibi=True),  # more queries than keys
]


@pytest.mark.parametrize("case", FUSED_DQ_CASES, ids=lambda c: c.id())
def test_hopper_fused_dq_matches_float64_reference(case):
    """deterministic=False: dQ, dK and dV all from the Hopper kernel (dQ added by float32 bulk reductions: formed
    by its consumers at D128, by its dQ warpgroup at D64), D64 and D128, against float64."""
    (q, k, v), kw = make_inputs(case, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    dout = torch.randn(q.shape, device="cuda", dtype=torch.bfloat16)
    assert hopper.unsupported(q, k, v, None, None, None, None, 0.0, case.causal, False, dout, fused_dq=True) is None
    out = M.attention(q, k, v, backend="triton", deterministic=False, **kw)
    grads = torch.autograd.grad(out, [q, k, v], dout)
    assert_gradients_close_to_reference(out, grads, [q, k, v], kw, dout, torch.bfloat16)


PADDED_HEAD_DIM_CASES = [  # D 72-120 run in tiles of 128 columns (hopper.tile_dim)
    AttnCase(2, 1024, 1024, 8, 8, 112, causal=True, alibi=True),  # MPT-30B's head dim: Q K^T on 64 + 32 + 16 columns
    AttnCase(2, 300, 300, 4, 2, 104, causal=True, alibi=True),  # the same 112 columns, 8 of them zeros; GQA
    AttnCase(2, 211, 300, 6, 2, 96, causal=True, alibi=True),  # chunked prefill, groups of 3, a partial tile
    AttnCase(1, 1000, 1000, 4, 1, 80, alibi=True),  # symmetric ALiBi, MQA, a ragged last key block
    AttnCase(2, 257, 257, 4, 4, 120),  # no bias
    AttnCase(2, 300, 300, 4, 2, 72, causal=True, alibi=True),  # the forward's products on 64 + 16 columns
    AttnCase(1, 333, 333, 4, 4, 88, alibi=True),  # on 64 + 32 columns, symmetric ALiBi
]


def _nan_beyond_head_dim(x, width=128):
    """``x`` as a view into a (B, S, H, width) buffer whose columns past D hold NaN: a kernel that read past D
    (instead of the copy engine's zero fill) would return NaN."""
    buf = torch.full((*x.shape[:3], width), float("nan"), dtype=x.dtype, device=x.device)
    buf[..., :x.shape[3]] = x.detach()
    return buf[..., :x.shape[3]].requires_grad_(x.requires_grad)


@pytest.mark.parametrize("deterministic", [False, True], ids=["fused-dq", "split"])
@pytest.mark.parametrize("case", PADDED_HEAD_DIM_CASES, ids=lambda c: c.id())
def test_head_dims_below_128_run_padded_on_the_hopper_kernels(case, deterministic, hopper_dkdv_launches):
    """Forward and backward at D 80-120 on the Hopper kernels against float64, inputs and dO read from rows
    that continue with NaN past D; the outputs (out, dQ, dK, dV) are written with the tile's extra columns
    dropped, so they must not spill into the next head either."""
    (q, k, v), kw = make_inputs(case, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    q, k, v = (_nan_beyond_head_dim(x) for x in (q, k, v))
    dout = _nan_beyond_head_dim(torch.randn(q.shape, device="cuda", dtype=torch.bfloat16))
    assert hopper.unsupported(q, k, v, None, None, None, None, 0.0, case.causal, False) is None
    _assert_forward_matches_reference(q, k, v, **kw)
    out = M.attention(q, k, v, backend="triton", deterministic=deterministic, **kw)
    grads = torch.autograd.grad(out, [q, k, v], dout)
    assert hopper_dkdv_launches == [(False, not deterministic, False)]
    assert_gradients_close_to_reference(out, grads, [q, k, v], kw, dout, torch.bfloat16)


@pytest.mark.parametrize("deterministic", [None, True], ids=["default", "split"])
@pytest.mark.parametrize("case", [AttnCase(2, 1024, 1024, 8, 2, 128, causal=True, alibi=True),
                                  AttnCase(2, 300, 300, 4, 4, 64, causal=True, alibi=True)], ids=lambda c: c.id())
def test_sdpa_layout_views_run_on_the_hopper_kernels(case, deterministic, hopper_dkdv_launches):
    """(B, H, S, D) tensors passed as their (B, S, H, D) transposes, heads S * D apart: read in place, and
    their gradients written in the same layout."""
    (q, k, v), kw = make_inputs(case, dtype=torch.bfloat16, device="cuda")
    q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2).requires_grad_() for x in (q, k, v))
    assert hopper.unsupported(q, k, v, None, None, None, None, 0.0, case.causal, False) is None
    _assert_forward_matches_reference(q, k, v, **kw)
    out = M.attention(q, k, v, backend="triton", deterministic=deterministic, **kw)
    dout = torch.randn_like(out).transpose(1, 2).contiguous().transpose(1, 2)
    grads = torch.autograd.grad(out, [q, k, v], dout)
    # D64's reproducible backward is the general kernels' (hopper.BWD_HEAD_DIMS)
    expected = [] if deterministic and case.head_dim == 64 else [(False, not deterministic, False)]
    assert hopper_dkdv_launches == expected
    assert [g.stride() for g in grads] == [x.stride() for x in (q, k, v)]
    assert_gradients_close_to_reference(out, grads, [q, k, v], kw, dout, torch.bfloat16)


BIAS_MATRIX_CASES = [  # a full-shape bias in q's dtype with its gradient, on the dQ warpgroup
    AttnCase(2, 1024, 1024, 8, 8, 128, bias="full"),  # non-causal (bench's dense-bias row, smaller)
    AttnCase(2, 1000, 1000, 8, 2, 128, causal=True, alibi=True, bias="full"),  # groups of 4, a ragged last block
    AttnCase(1, 512, 1536, 4, 1, 64, causal=True, bias="full"),  # chunked prefill, MQA, D64
    AttnCase(2, 264, 264, 4, 4, 64, alibi=True, bias="full"),  # symmetric ALiBi and a bias, partial tiles
    AttnCase(2, 264, 264, 4, 4, 112, causal=True, bias="full"),  # MPT-30B's head dim, in tiles of 128
]


@pytest.mark.parametrize("case", BIAS_MATRIX_CASES, ids=lambda c: c.id())
def test_dq_warpgroup_reads_a_bias_matrix_and_stores_its_gradient(case, hopper_dkdv_launches):
    """One Hopper kernel for dQ, dK, dV and dbias (dS stored from the dQ warpgroup's ring), against float64."""
    (q, k, v), kw = make_inputs(case, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    kw["attn_bias"] = bias = kw["attn_bias"].detach().to(torch.bfloat16).requires_grad_()
    out = M.attention(q, k, v, backend="triton", deterministic=False, **kw)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, [q, k, v, bias], dout)
    assert hopper_dkdv_launches == [(True, True, True)]
    assert_gradients_close_to_reference(out, grads, [q, k, v, bias], kw, dout, torch.bfloat16)


@pytest.mark.parametrize("shape", [(1, 4, 296, 304), (2, 1, 296, 304), (1, 1, 296, 304)],
                         ids=["per-head", "per-batch", "one-matrix"])
def test_dq_warpgroup_reads_a_broadcast_bias_matrix(shape, hopper_dkdv_launches):
    """A bias matrix broadcast over batch and/or heads, without its gradient (the copy engine's rows
    b * b_mult + h * h_mult); chunked prefill with causal ALiBi, GQA."""
    (q, k, v), kw = make_inputs(AttnCase(2, 296, 304, 4, 2, 128, causal=True, alibi=True), dtype=torch.bfloat16,
                                device="cuda", requires_grad=True)
    kw["attn_bias"] = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    out = M.attention(q, k, v, backend="triton", deterministic=False, **kw)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, [q, k, v], dout)
    assert hopper_dkdv_launches == [(True, True, False)]
    assert_gradients_close_to_reference(out, grads, [q, k, v], kw, dout, torch.bfloat16)


@pytest.mark.parametrize("case, shape, dtype", [
    pytest.param(AttnCase(2, 304, 304, 4, 4, 64), (2, 4, 304, 304), torch.bfloat16, id="D64-full-shape-non-causal"),
    pytest.param(AttnCase(2, 296, 304, 4, 2, 64, causal=True, alibi=True), (1, 4, 296, 304), torch.bfloat16,
                 id="D64-per-head-causal-alibi-chunked-prefill-gqa"),
    pytest.param(AttnCase(2, 640, 640, 4, 1, 64, alibi=True), (2, 1, 640, 640), torch.float16,
                 id="D64-per-batch-symmetric-alibi-mqa-fp16"),
    pytest.param(AttnCase(1, 1000, 1000, 8, 8, 64, causal=True), (1, 1, 1000, 1000), torch.bfloat16,
                 id="D64-one-matrix-causal-ragged-blocks"),
    pytest.param(AttnCase(2, 304, 304, 4, 4, 128), (2, 4, 304, 304), torch.bfloat16, id="D128-full-shape"),
    pytest.param(AttnCase(2, 296, 304, 8, 2, 128, causal=True, alibi=True), (1, 8, 296, 304), torch.bfloat16,
                 id="D128-per-head-causal-alibi-chunked-prefill-gqa"),
    pytest.param(AttnCase(2, 264, 264, 4, 4, 112, causal=True), (2, 4, 264, 264), torch.bfloat16,
                 id="D112-causal"),
    pytest.param(AttnCase(1, 640, 640, 4, 2, 80, alibi=True), (1, 1, 640, 640), torch.float16,
                 id="D80-one-matrix-symmetric-alibi-fp16"),
])
def test_hopper_forward_reads_a_bias_matrix(monkeypatch, hopper_forward_bias_shapes, case, shape, dtype):
    """The Hopper forward reads a bias matrix in q's dtype, its [64, 128] tiles riding with K (at tile width 128
    with one Q buffer per program): output and log-sum-exp against float64, with 3 programs taking every tile
    (Q buffers and K/V stages reused across tiles)."""
    monkeypatch.setattr(hopper, "sm_count", lambda device_index: 3)
    (q, k, v), kw = make_inputs(case, dtype=dtype, device="cuda")
    bias = torch.randn(shape, device="cuda", dtype=dtype)
    _assert_forward_matches_reference(q, k, v, **kw, attn_bias=bias)
    assert hopper_forward_bias_shapes == [shape]


@pytest.mark.parametrize("d", [64, 128])
def test_hopper_bias_row_terms_follow_writes_scales_and_graphs(d):
    """MPT's bias row reaches the Hopper forward as per-key terms (``row_keys_kernel``) kept on its converted row,
    itself kept on the bias (``kept.kept_on``): made once for repeated calls, made again after a write to the bias
    and for another softmax scale, and recomputed inside a CUDA graph captured after they were kept."""
    case = AttnCase(2, 300, 300, 4, 2, d, causal=True, bias="vector")
    (q, k, v), kw = make_inputs(case, dtype=torch.bfloat16, device="cuda")
    bias = kw["attn_bias"]
    run = lambda scale=None: M.attention(q, k, v, backend="triton", causal=True, attn_bias=bias,  # noqa: E731
                                         softmax_scale=scale)
    run()
    [rows] = kept_values(bias, "_mpt_attention_bias_rows")
    [keys] = kept_values(rows, "_mpt_attention_row_keys")
    run()
    again = kept_values(bias, "_mpt_attention_bias_rows") + kept_values(rows, "_mpt_attention_row_keys")
    assert len(again) == 2 and again[0] is rows and again[1] is keys
    graph, captured = capture_cuda_graph(run)
    for step, scale in enumerate((None, 0.3)):
        bias[..., 40 * step:40 * step + 90].mul_(-2.5)
        _assert_forward_matches_reference(q, k, v, causal=True, attn_bias=bias, softmax_scale=scale)
        if scale is None:
            graph.replay()
            _assert_forward_matches_reference(q, k, v, causal=True, attn_bias=bias)
            ref, _ = reference_attention(q.double(), k.double(), v.double(), causal=True, attn_bias=bias)
            low, _ = reference_attention(q, k, v, causal=True, attn_bias=bias, compute_dtype=q.dtype)
            assert_close_to_reference("graph replay", captured, ref, low)


@pytest.mark.parametrize("d", [64, 128])
def test_hopper_forward_bias_matrix_masks_rows_with_inf_and_float_min(hopper_forward_bias_shapes, d):
    """A bias matrix that removes keys with -inf (batch row 0: queries 0-39 see no key, output 0) and
    masks them with bf16's min (batch row 1: queries 0-39 take the plain average of the keys they see, as
    natural-unit softmax does), against float64."""
    b, s, h = 2, 304, 4
    q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    bias = torch.randn(b, h, s, s, device="cuda", dtype=torch.bfloat16)
    bias[0, :, :, :40] = float("-inf")
    bias[1, :, :, :40] = torch.finfo(torch.bfloat16).min
    out = M.attention(q, k, v, backend="triton", causal=True, attn_bias=bias)
    assert hopper_forward_bias_shapes == [tuple(bias.shape)]
    ref, _ = reference_attention(q.double(), k.double(), v.double(), causal=True, attn_bias=bias.double())
    torch.testing.assert_close(out.double(), ref, rtol=2e-2, atol=2e-2)
    assert torch.equal(out[0, :40], torch.zeros_like(out[0, :40]))
    averages = v[1, :40].float().cumsum(0) / torch.arange(1, 41, device="cuda").view(40, 1, 1)
    torch.testing.assert_close(out[1, :40].float(), averages, rtol=2e-2, atol=2e-2)


def test_dq_warpgroup_with_a_bias_matrix_keeps_dk_dv_dbias_reproducible(hopper_dkdv_launches):
    """dK, dV and dbias are reproducible in every mode (api.attention): dS is stored, never summed."""
    (q, k, v), kw = make_inputs(AttnCase(2, 512, 512, 8, 4, 128, causal=True, bias="full"), dtype=torch.bfloat16,
                                device="cuda", requires_grad=True)
    kw["attn_bias"] = bias = kw["attn_bias"].detach().to(torch.bfloat16).requires_grad_()
    runs = []
    for _ in range(2):
        out = M.attention(q, k, v, backend="triton", deterministic=False, **kw)
        runs.append(torch.autograd.grad(out, [q, k, v, bias], torch.ones_like(out)))
    assert hopper_dkdv_launches == [(True, True, True)] * 2
    torch.testing.assert_close(runs[0][0], runs[1][0], rtol=1e-2, atol=1e-2)  # dQ: sums in any order
    for name, a, b in zip(["dk", "dv", "dbias"], runs[0][1:], runs[1][1:]):
        assert torch.equal(a, b), name


def test_hopper_backward_is_bitwise_deterministic():
    (q, k, v), kw = make_inputs(AttnCase(2, 1500, 1500, 8, 2, 128, causal=True, alibi=True), dtype=torch.bfloat16,
                                device="cuda", requires_grad=True)
    runs = []
    for _ in range(2):
        out = M.attention(q, k, v, backend="triton", deterministic=True, **kw)
        runs.append(torch.autograd.grad(out, [q, k, v], torch.ones_like(out)))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_per_batch_slopes_and_strided_views():
    """(B, H) slopes, and q/k/v as views into one packed (B, S, 3*H*D) projection (the seed's layout)."""
    b, s, h, d = 2, 333, 4, 128
    qkv = torch.randn(b, s, 3 * h * d, device="cuda", dtype=torch.bfloat16)
    q, k, v = (t.unflatten(-1, (h, d)) for t in qkv.chunk(3, dim=-1))
    assert not q.is_contiguous()
    slopes = torch.rand(b, h, device="cuda") * 0.5
    out = M.attention(q, k, v, backend="triton", causal=True, alibi_slopes=slopes)
    ref, _ = reference_attention(q.double(), k.double(), v.double(), causal=True, alibi_slopes=slopes)
    low, _ = reference_attention(q, k, v, causal=True, alibi_slopes=slopes, compute_dtype=torch.bfloat16)
    assert_close_to_reference("out", out, ref, low)


BIAS_ROW_CASES = [  # (case, bias dtype): the bias is a (1, H, 1, S_k) row as MPT builds it, random values
    (AttnCase(2, 1024, 1024, 8, 2, 128, causal=True, bias="vector"), torch.float32),
    (AttnCase(2, 1024, 1024, 8, 2, 128, causal=True, alibi=True, bias="vector"), torch.bfloat16),  # both
    (AttnCase(2, 211, 300, 4, 4, 64, causal=True, bias="vector"), torch.float32),  # chunked prefill, ragged
    (AttnCase(1, 1000, 1000, 4, 1, 128, alibi=True, bias="vector"), torch.float16),  # symmetric ALiBi, MQA
    (AttnCase(2, 300, 300, 4, 2, 80, causal=True, alibi=True, bias="vector"), torch.float32),  # 64 + 16 columns
    (AttnCase(2, 1024, 1024, 8, 8, 64, causal=True, alibi=True, bias="vector"), torch.float32),  # D64, both
    (AttnCase(1, 777, 777, 4, 2, 64, alibi=True, bias="vector"), torch.bfloat16),  # D64 symmetric, ragged
    # without ALiBi the row joins the unscaled scores through the bfloat16 extension product (ROW_KEYS):
    # beside fp16 products, and non-causal
    (AttnCase(2, 257, 300, 4, 2, 64, causal=True, bias="vector"), torch.float16),
    (AttnCase(1, 333, 333, 4, 4, 128, bias="vector"), torch.float32),
    (AttnCase(2, 300, 300, 4, 2, 104, causal=True, bias="vector"), torch.float32),  # Q K^T on 64 + 32 + 16 columns
]


@pytest.mark.parametrize("case, bias_dtype", BIAS_ROW_CASES,
                         ids=lambda x: x.id() if isinstance(x, AttnCase) else str(x))
def test_hopper_bias_row_matches_float64_reference(case, bias_dtype):
    dtype = torch.float16 if bias_dtype == torch.float16 else torch.bfloat16
    (q, k, v), kw = make_inputs(case, dtype=dtype, device="cuda")
    kw["attn_bias"] = kw["attn_bias"].to(bias_dtype)
    assert hopper.unsupported(q, k, v, kw["attn_bias"], None, None, None, 0.0, case.causal, False) is None
    _assert_forward_matches_reference(q, k, v, **kw)


@pytest.mark.parametrize("d", [64, 128])
def test_hopper_bias_row_broadcasts_and_masks_like_the_general_kernel(monkeypatch, d):
    """Per-batch rows, a row expanded over the batch by stride 0, rows sliced out of longer ones (MPT
    slices its max_seq_len bias; unaligned ones and a strided one reach the kernel as an aligned copy),
    and -inf keys: key 0 masked too, so query 0 of the causal tile sees nothing (output 0, LSE -inf,
    never NaN) and the rest see fewer keys. D64 and D128 read the row in different orders."""
    b, s, h = 2, 400, 4
    q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    masked = torch.randn(1, h, 1, s, device="cuda")
    masked[..., :3] = float("-inf")
    masked[..., 97] = float("-inf")
    biases = {"per-batch": torch.randn(b, 1, 1, s, device="cuda"),
              "expanded": torch.randn(1, h, 1, s, device="cuda").expand(b, h, 1, s),
              "sliced": torch.randn(1, h, 1, s + 16, device="cuda")[..., 16:],
              "sliced-unaligned": torch.randn(1, h, 1, s + 3, device="cuda")[..., 3:],
              "sliced-unaligned-bf16": torch.randn(b, h, 1, s + 1, device="cuda", dtype=torch.bfloat16)[..., 1:],
              "strided-keys": torch.randn(1, h, 1, 2 * s, device="cuda")[..., ::2],
              "masked": masked}
    for name, bias in biases.items():
        monkeypatch.setattr(hopper, "ENABLED", True)
        assert hopper.unsupported(q, k, v, bias, None, None, None, 0.0, True, False) is None, name
        runs = []
        for enabled in (True, False):
            monkeypatch.setattr(hopper, "ENABLED", enabled)
            runs.append(M.attention(q, k, v, backend="triton", causal=True, attn_bias=bias, return_lse=True))
        (out, lse), (out_general, lse_general) = runs
        assert not out.isnan().any(), name
        torch.testing.assert_close(out.float(), out_general.float(), rtol=2e-2, atol=2e-2, msg=name)
        torch.testing.assert_close(lse, lse_general, rtol=1e-4, atol=1e-4, msg=name)
        if name != "masked":
            ref, _ = reference_attention(q.double(), k.double(), v.double(), causal=True, attn_bias=bias)
            low, _ = reference_attention(q, k, v, causal=True, attn_bias=bias, compute_dtype=torch.bfloat16)
            assert_close_to_reference(name, out, ref, low)


def test_bias_row_in_the_fused_dq_backward_at_a_padded_head_dim(hopper_dkdv_launches):
    """MPT's bias row without its gradient at D80: the backward with dQ formed in the dK/dV kernel (by its
    consumers), its products on 64 + 16 columns (``hopper.product_tail``), against float64."""
    (q, k, v), kw = make_inputs(AttnCase(2, 300, 300, 4, 2, 80, causal=True, alibi=True, bias="vector"),
                                dtype=torch.bfloat16, device="cuda", requires_grad=True)
    kw["attn_bias"].requires_grad_(False)  # with its gradient the general backward takes it (dbias)
    out = M.attention(q, k, v, backend="triton", deterministic=False, **kw)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, [q, k, v], dout)
    assert hopper_dkdv_launches == [(False, True, False)]
    assert_gradients_close_to_reference(out, grads, [q, k, v], kw, dout, torch.bfloat16)


@pytest.mark.parametrize("d", [64, 80, 128])
@pytest.mark.parametrize("s_q", [129, 200, 300])  # (shorter ones take the general kernels)
def test_dkdv_steps_past_the_last_query_see_no_probability_whatever_the_bias_row(s_q, d, hopper_dkdv_launches):
    """The dK/dV kernel's last step of queries runs past S_q; those rows read zeros for Q and dO and +inf for their
    LSE offsets (``hopper_dkdv.row_stats_buffer``'s padding; at tile width 64 no select), so P is 0 there even where
    the bias row lifts a key's score by 100 (an offset of 0 would give exp2(144): inf, and inf * 0 = NaN in dV)."""
    b, h, s_k = 2, 4, 300
    q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for s in (s_q, s_k, s_k))
    bias = torch.randn(1, h, 1, s_k, device="cuda")
    dout = torch.randn(b, s_q, h, d, device="cuda", dtype=torch.bfloat16)
    runs = []
    for shift in (0.0, 100.0):  # the same softmax: every key lifted alike
        out = M.attention(q, k, v, backend="triton", deterministic=False, causal=True, attn_bias=bias + shift)
        runs.append((out, *torch.autograd.grad(out, [q, k, v], dout)))
    assert len(hopper_dkdv_launches) == 2 and all(launch[1] for launch in hopper_dkdv_launches)  # fused dQ
    assert_gradients_close_to_reference(runs[0][0], runs[0][1:], [q, k, v], dict(causal=True, attn_bias=bias), dout,
                                        torch.bfloat16)
    for name, plain, lifted in zip(["out", "dq", "dk", "dv"], *runs):
        assert lifted.isfinite().all(), name
        # (exp2's arguments 144 log2 units up: float32 rounding there, ~1e-5 of P)
        torch.testing.assert_close(lifted.float(), plain.float(), rtol=2e-2, atol=2e-2, msg=name)


@pytest.mark.parametrize("bias_grad", [True, False], ids=["dbias-general-backward", "no-dbias-hopper-dkdv"])
def test_bias_row_gradients_after_the_hopper_forward(monkeypatch, bias_grad):
    """Hopper forward with a bias row. With its gradient the general backward (dbias) reads the Hopper
    LSE; without, the Hopper dK/dV kernel adds the row itself."""
    (q, k, v), kw = make_inputs(AttnCase(2, 300, 300, 4, 2, 128, causal=True, alibi=True, bias="vector"),
                                dtype=torch.bfloat16, device="cuda", requires_grad=True)
    kw["attn_bias"].requires_grad_(bias_grad)
    wrt = [q, k, v, kw["attn_bias"]] if bias_grad else [q, k, v]
    dout = torch.randn(q.shape, device="cuda", dtype=torch.bfloat16)
    outs, runs = [], []
    for enabled in (True, False):
        monkeypatch.setattr(hopper, "ENABLED", enabled)
        outs.append(M.attention(q, k, v, backend="triton", **kw))
        runs.append(torch.autograd.grad(outs[-1], wrt, dout))
    for name, a, b in zip(["dq", "dk", "dv", "dbias"], *runs):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2, msg=name)
    if not bias_grad:
        assert_gradients_close_to_reference(outs[0], runs[0], [q, k, v], kw, dout, torch.bfloat16)


@pytest.mark.parametrize("bias_dtype,route", [
    pytest.param(torch.float32, "hopper", id="fp32-row-hopper"),
    pytest.param(torch.bfloat16, "hopper", id="bf16-row-hopper"),
    pytest.param(torch.float32, "hopper-dq-warpgroup", id="fp32-row-hopper-dq-warpgroup"),
    pytest.param(torch.float32, "general", id="fp32-row-general"),
    pytest.param(torch.bfloat16, "full", id="bf16-full"),
    pytest.param(torch.bfloat16, "full-grad", id="bf16-full-grad-dq-gemm"),
    pytest.param(torch.bfloat16, "full-grad-dq-warpgroup", id="bf16-full-grad-dq-warpgroup"),
])
def test_rows_masked_only_by_float32_min_on_every_kernel_route(bias_dtype, route, monkeypatch, hopper_dkdv_launches):
    """MPT folds left padding into its bias row as finfo(float32).min (masks.build_mpt_attn_bias). Causal
    query rows that see only padded keys take the uniform softmax over those equally-masked keys, as
    natural-unit math does (docs/errors.md), not the empty row (output 0) that min * log2(e) overflowing
    to -inf would make; and their gradients, through the output and the log-sum-exp, are the reference's
    (the backward reads the key count from the stored log-sum-exp). Hopper kernels, general kernels, a
    full bias, and a full bias with its gradient (dQ from the stored dS; or the Hopper kernel's dQ warpgroup
    storing dS, which needs rows of 16-byte multiples: S 304)."""
    b, s, h, d = 2, 304, 4, 128
    q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    keep = torch.ones(b, s, dtype=torch.bool, device="cuda")
    keep[1, :40] = False  # left padding of batch row 1: its first 40 causal rows see only padding
    bias = M.build_mpt_attn_bias("triton", h, s, alibi=True, attention_mask=keep, dtype=bias_dtype, device="cuda")
    assert bias.shape == (b, h, 1, s) and bias.min() == torch.finfo(bias_dtype).min
    if route.startswith("full"):
        bias = bias.expand(b, h, s, s).contiguous().requires_grad_(route.startswith("full-grad"))
    if route.startswith("hopper"):
        assert hopper.unsupported(q, k, v, bias, None, None, None, 0.0, True, False, q) is None
    monkeypatch.setattr(hopper, "ENABLED", route.startswith("hopper") or route == "full-grad-dq-warpgroup")
    dout = torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16)
    dlse = torch.randn(b, h, s, device="cuda")
    out, lse = M.attention(q, k, v, backend="triton", causal=True, attn_bias=bias, return_lse=True,
                           deterministic=not route.endswith("dq-warpgroup"))
    inputs = [q, k, v, bias] if bias.requires_grad else [q, k, v]
    grads = torch.autograd.grad([out, lse], inputs, [dout, dlse])
    if route == "full-grad-dq-warpgroup":
        assert hopper_dkdv_launches == [(True, True, True)]
    # query i of the padded row sees keys 0..i, all at the same min: their plain average
    averages = v[1, :40].detach().float().cumsum(0) / torch.arange(1, 41, device="cuda").view(40, 1, 1)
    torch.testing.assert_close(out[1, :40].float(), averages, rtol=2e-2, atol=2e-2)
    assert_gradients_close_to_reference(out, grads, inputs, dict(causal=True, attn_bias=bias), dout,
                                        torch.bfloat16, dlse=dlse)


@pytest.mark.parametrize("d, n_kv, pad, matrix", [
    pytest.param(64, 2, 100, False, id="D64-GQA-rows-0-99-soft: blocks 0 and 1 scaled, 2-5 read from dO"),
    pytest.param(64, 8, 0, False, id="D64-no-soft-row: nothing scaled"),
    pytest.param(128, 8, 64, True, id="D128-bias-matrix-rows-0-63-soft: block 0 scaled"),
    pytest.param(128, 8, 70, False, id="D128-row: every row copied (the consumers form dQ)"),
])
def test_fused_backward_reads_scaled_do_only_in_blocks_with_a_soft_masked_row(d, n_kv, pad, matrix, monkeypatch,
                                                                              hopper_dkdv_launches):
    """The fused Hopper backward with MPT's bias (row, or expanded to a matrix): where the dQ warpgroup forms dQ
    (``hopper_dkdv.scaled_dout_blocks``) the delta kernel writes dO scaled only in the 64-query blocks holding a row
    that sees only finfo.min keys, and the loader reads the other blocks from dO itself. The copy's other rows are NaN
    here, so a block read from the wrong source poisons the gradients; q's, k's and v's gradients (through the output
    and the LSE) against float64."""
    from mpt_attention.impl.triton import plans

    monkeypatch.setattr(plans, "scaled_dout_buffer", lambda dout: torch.full_like(dout, float("nan")))
    b, s, h = 2, 336 if matrix else 333, 8  # (a matrix's rows of 16-byte multiples, for the copy engine)
    q = torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(b, s, n_kv, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    keep = torch.ones(b, s, dtype=torch.bool, device="cuda")
    keep[1, :pad] = False  # left padding: batch row 1's first ``pad`` causal rows see only padding
    bias = M.build_mpt_attn_bias("triton", h, s, alibi=True, attention_mask=keep,
                                 dtype=torch.bfloat16 if matrix else torch.float32, device="cuda")
    if matrix:
        bias = bias.expand(b, h, s, s).contiguous()
    assert hopper_dkdv.scaled_dout_blocks(d, matrix) == (d == 64 or matrix)
    dout = torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16)
    dlse = torch.randn(b, h, s, device="cuda")
    out, lse = M.attention(q, k, v, backend="triton", causal=True, attn_bias=bias, return_lse=True,
                           deterministic=False)
    grads = torch.autograd.grad([out, lse], [q, k, v], [dout, dlse])
    assert hopper_dkdv_launches == [(matrix, True, False)]  # the fused route
    assert not any(g.isnan().any() for g in grads)
    assert_gradients_close_to_reference(out, grads, [q, k, v], dict(causal=True, attn_bias=bias), dout,
                                        torch.bfloat16, dlse=dlse)


@pytest.mark.parametrize("deterministic", [True, False], ids=["dq-kernel", "fused-dq"])
def test_hopper_dkdv_with_a_bias_row_that_masks_whole_rows(monkeypatch, deterministic):
    """Keys 0-2 at -inf: causal query rows 0-2 see nothing (LSE -inf). The Hopper dK/dV kernel (and the dQ
    it forms) must give them zero probability, as the general one does, not NaN."""
    b, s, h, d = 2, 300, 4, 128
    q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    bias = torch.randn(1, h, 1, s, device="cuda")
    bias[..., :3] = float("-inf")
    dout = torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16)
    runs = []
    for enabled in (True, False):
        monkeypatch.setattr(hopper, "ENABLED", enabled)
        out = M.attention(q, k, v, backend="triton", causal=True, attn_bias=bias, deterministic=deterministic)
        runs.append(torch.autograd.grad(out, [q, k, v], dout))
    for name, a, ref in zip(["dq", "dk", "dv"], *runs):
        assert not a.isnan().any(), name
        torch.testing.assert_close(a.float(), ref.float(), rtol=2e-2, atol=2e-2, msg=name)


@pytest.mark.parametrize("group", [1, 3, 8], ids=["a-group-per-head", "groups-of-3-of-8-heads", "one-group"])
def test_hopper_forward_runs_every_tile_in_any_head_grouping(monkeypatch, group):
    # the grid's order (hopper_tiles.tile_order): longest tiles first within groups of heads, the one
    # smaller group first; 3 query tiles by 8 (batch, head) rows here
    case = AttnCase(2, 300, 300, 4, 2, 64, causal=True, alibi=True)
    (q, k, v), kw = make_inputs(case, dtype=torch.bfloat16, device="cuda")
    per_head = 2 * k[0, :, 0].numel() * k.element_size() * k.shape[2] / q.shape[2]  # K and V per query head
    monkeypatch.setattr(hopper, "L2_GROUP_BYTES", per_head * group)
    assert hopper.heads_per_group(k, q.shape[2], 8) == group
    _assert_forward_matches_reference(q, k, v, **kw)


@pytest.mark.parametrize("rows", [1, 3, 16], ids=["row-after-row", "groups-of-3-rows", "one-group"])
@pytest.mark.parametrize("deterministic", [True, None], ids=["split", "fused-dq"])
def test_hopper_backward_runs_every_key_block_in_any_row_grouping(monkeypatch, rows, deterministic):
    """The dK/dV kernel's grid order (hopper_tiles.tile_order over (key block, row)): key blocks of a group
    of rows interleaved, first first. 3 key blocks by 8 rows (batch, KV head) on the split, with the dQ
    warpgroup 16 rows (batch, KV head, split: two programs per group of 4 query heads); 3 leaves a smaller
    first group."""
    case = AttnCase(2, 300, 300, 16, 4, 128, causal=True, alibi=True)
    (q, k, v), kw = make_inputs(case, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    dout = torch.randn(q.shape, device="cuda", dtype=torch.bfloat16)
    monkeypatch.setattr(hopper_dkdv, "bwd_rows_per_group", lambda q, n_rows, *rest: min(rows, n_rows))
    out = M.attention(q, k, v, backend="triton", deterministic=deterministic, **kw)
    grads = torch.autograd.grad(out, [q, k, v], dout)
    assert_gradients_close_to_reference(out, grads, [q, k, v], kw, dout, torch.bfloat16)


@pytest.mark.parametrize("programs", [1, 3, 7], ids=["one-program", "3-programs", "7-programs"])
def test_persistent_forward_programs_run_every_tile_once(monkeypatch, programs):
    # the forward is persistent (one program per SM taking tiles from a counter); fewer programs than tiles
    # puts many tiles through each program's two Q buffers and K/V stages, with a bias row riding with V
    case = AttnCase(2, 333, 333, 4, 2, 128, causal=True, alibi=True)
    (q, k, v), kw = make_inputs(case, dtype=torch.bfloat16, device="cuda")
    bias = torch.randn(2, 4, 1, 333, device="cuda")
    monkeypatch.setattr(hopper, "sm_count", lambda device_index: programs)
    for extra in ({}, {"attn_bias": bias}):
        _assert_forward_matches_reference(q, k, v, **kw, **extra)


def test_hopper_and_general_kernels_agree_and_gradients_flow(monkeypatch):
    (q, k, v), kw = make_inputs(AttnCase(2, 700, 700, 8, 2, 128, causal=True, alibi=True), dtype=torch.bfloat16,
                                device="cuda", requires_grad=True)
    dout = torch.randn(q.shape, device="cuda", dtype=torch.bfloat16)
    runs = []
    for enabled in (True, False):
        monkeypatch.setattr(hopper, "ENABLED", enabled)
        out, lse = M.attention(q, k, v, backend="triton", return_lse=True, **kw)
        runs.append((out, lse, *torch.autograd.grad(out, [q, k, v], dout)))
    for name, a, b in zip(["out", "lse", "dq", "dk", "dv"], *runs):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2, msg=name)


@pytest.mark.parametrize("bias", [None, "row", "matrix-with-grad"])
def test_steps_on_kept_launch_plans_compute_what_fresh_decisions_compute(monkeypatch, bias):
    """A training step decided afresh (``plans.ENABLED`` off), planned, and on the kept plans with other tensors of
    the same signature: the forward, dK, dV and dbias bitwise equal (dQ's float32 sums may change order)."""
    from mpt_attention.impl.triton import plans

    case = AttnCase(2, 320, 320, 8, 2 if bias != "matrix-with-grad" else 8, 128 if bias != "row" else 64,
                    causal=True, alibi=bias is None)
    (q, k, v), kw = make_inputs(case, dtype=torch.bfloat16, device="cuda")
    if bias == "row":
        kw["attn_bias"] = torch.randn(1, 8, 1, 320, device="cuda")
    elif bias is not None:  # its gradient stored by the dK/dV kernel (rows of 16-byte multiples)
        kw["attn_bias"] = torch.randn(2, 8, 320, 320, device="cuda", dtype=torch.bfloat16)
    dout = torch.randn(q.shape, device="cuda", dtype=torch.bfloat16)
    runs = []
    for enabled in (False, True, True):
        monkeypatch.setattr(plans, "ENABLED", enabled)
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        extra = dict(kw)
        if bias == "matrix-with-grad":
            extra["attn_bias"] = kw["attn_bias"].detach().clone().requires_grad_()
            leaves.append(extra["attn_bias"])
        out, lse = M.attention(*leaves[:3], backend="triton", return_lse=True, **extra)
        runs.append((out, lse, *torch.autograd.grad(out, leaves, dout)))
    assert {key[0] for key in plans.KEPT} >= {"forward", "backward"}
    for run in runs[1:]:
        for name, a, b in zip(["out", "lse", "dq", "dk", "dv", "dbias"], runs[0], run):
            if name == "dq":
                torch.testing.assert_close(a, b, msg=name)
            else:
                assert torch.equal(a, b), name


def test_hopper_forward_is_bitwise_deterministic():
    (q, k, v), kw = make_inputs(AttnCase(2, 2048, 2048, 8, 2, 128, causal=True, alibi=True), dtype=torch.bfloat16,
                                device="cuda")
    assert torch.equal(M.attention(q, k, v, backend="triton", **kw), M.attention(q, k, v, backend="triton", **kw))


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("bias", ["slopes", "row"])
def test_reach_forward_gives_one_answer_over_many_calls(bias, head_dim):
    """Past the reach, each consumer takes its tile's first block from the loader's slot. Until session 42 one
    read of it came after the slot went back to the loader, which then wrote the next tile's there: rarely a
    consumer counted its blocks wrong and waited on a stage phase that never came (two stops of long runs at D64,
    benchmarks/NOTES.md) or read a stage early. 1000 calls of the persistent forward (tiles taken in a different
    order each call) must each finish and give the first call's output bit for bit."""
    batch, heads = (4, 32) if head_dim == 64 else (2, 16)
    (q, k, v), kw = make_inputs(AttnCase(batch, 4096, 4096, heads, heads, head_dim, causal=True, alibi=True),
                                dtype=torch.bfloat16, device="cuda")
    if bias == "row":
        kw = {"causal": True, "attn_bias": _mpt_row(kw["alibi_slopes"], 4096)}
    assert hopper.reach_applies(kw.get("attn_bias"), kw.get("alibi_slopes"), True, 1 if bias == "slopes" else 0,
                                batch, 4096)
    first = M.attention(q, k, v, backend="triton", **kw)
    differs = [(M.attention(q, k, v, backend="triton", **kw) != first).any() for _ in range(1000)]
    assert not torch.stack(differs).any()


@pytest.mark.parametrize("what", ["padding-symmetric-alibi", "dropout", "head-dim-48", "more-queries-than-keys",
                                  "misaligned", "bias-matrix", "decode"])
def test_inputs_outside_its_scope_take_the_general_kernel(what):
    """Each of these has a reason; the call still gives the reference's answer (general kernel)."""
    case = AttnCase(2, 200, 200, 4, 2, 48 if what == "head-dim-48" else 64, causal=True, alibi=True,
                    bias="matrix" if what == "bias-matrix" else None)
    if what == "padding-symmetric-alibi":  # (causal padding goes to the Hopper kernels as a bias row: below)
        case = AttnCase(2, 200, 200, 4, 2, 64, alibi=True, padding=True)
    if what == "more-queries-than-keys":
        case = AttnCase(2, 200, 150, 4, 2, 64, causal=True, alibi=True)
    if what == "decode":
        case = AttnCase(4, 1, 4097, 8, 2, 128, causal=True, alibi=True)
    (q, k, v), kw = make_inputs(case, dtype=torch.bfloat16, device="cuda")
    if what == "misaligned":
        q = torch.randn(2, 200, 4, 65, device="cuda", dtype=torch.bfloat16)[..., 1:]
    why = hopper.unsupported(q, k, v, kw.get("attn_bias"), kw.get("key_padding_mask"), None, None,
                             0.1 if what == "dropout" else 0.0, case.causal, False)
    assert why is not None
    assert not key_padding.takes_hopper(q, k, v, kw.get("attn_bias"), kw.get("alibi_slopes"),
                                        kw.get("key_padding_mask"), None, None, 0.0, case.causal, None)
    if what != "dropout":
        out = M.attention(q, k, v, backend="triton", **kw)
        ref, _ = reference_attention(q.double(), k.double(), v.double(), **kw)
        low, _ = reference_attention(q, k, v, compute_dtype=torch.bfloat16, **kw)
        assert_close_to_reference("out", out, ref, low)


KEY_PADDING_CASES = [
    AttnCase(2, 1024, 1024, 8, 2, 128, causal=True, alibi=True, padding=True),
    AttnCase(3, 600, 600, 4, 4, 64, causal=True, alibi=True, padding="left"),  # rows that see no key: 0, LSE -inf
    AttnCase(2, 300, 700, 4, 2, 64, causal=True, padding=True),  # chunked prefill after a cache
    AttnCase(2, 500, 500, 4, 1, 128, padding=True),  # non-causal without ALiBi, MQA
    AttnCase(2, 4096, 4096, 4, 4, 64, causal=True, alibi=True, padding="left"),  # the row's reach past removed keys
    AttnCase(2, 4096, 4096, 4, 2, 128, causal=True, alibi=True, padding=True),
]


@pytest.mark.parametrize("deterministic", [None, True], ids=["fused-dq", "split"])
@pytest.mark.parametrize("case", KEY_PADDING_CASES, ids=lambda c: c.id())
def test_key_padding_mask_runs_on_the_hopper_kernels(case, deterministic, hopper_forward_bias_shapes,
                                                     hopper_dkdv_launches):
    """``key_padding_mask`` (with causal ALiBi from slopes, or alone) reaches the Hopper kernels as a bias row
    (impl/triton/key_padding.py), forward and backward, against float64; the padded keys of K and V hold NaN and
    inf, which must not reach any output or gradient (the kernels read zeroed copies). The references read the
    clean K and V: their P V would turn a padded key's 0 * inf into NaN."""
    (q, k, v), kw = make_inputs(case, dtype=torch.bfloat16, device="cuda")
    pad = ~kw["key_padding_mask"].view(case.batch, case.s_k, 1, 1)
    assert pad.any()
    dirty = (q, k.masked_fill(pad, float("nan")), v.masked_fill(pad, float("inf")))
    out, lse = M.attention(*dirty, backend="triton", return_lse=True, **kw)
    ref, ref_lse = reference_attention(q.double(), k.double(), v.double(), **kw)
    assert_close_to_reference("out", out, ref, reference_attention(q, k, v, compute_dtype=q.dtype, **kw)[0])
    torch.testing.assert_close(lse.double(), ref_lse, rtol=0, atol=1e-3)
    inputs = [x.clone().requires_grad_() for x in dirty]
    rows = (case.batch, case.n_heads if case.alibi else 1, 1, case.s_k)
    assert hopper_forward_bias_shapes == [rows]
    out = M.attention(*inputs, backend="triton", deterministic=deterministic, **kw)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, inputs, dout)
    # (the reproducible backward keeps the general kernels at D64: hopper.BWD_HEAD_DIMS)
    assert hopper_forward_bias_shapes == [rows, rows]
    assert len(hopper_dkdv_launches) == (0 if deterministic and case.head_dim == 64 else 1)
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
    for g in grads[1:]:
        assert (g.masked_select(pad.expand_as(g)) == 0).all()
    assert_gradients_close_to_reference(out, grads, [q, k, v], kw, dout, torch.bfloat16)


@pytest.mark.parametrize("shape_q, heads_kv", [((0, 256, 4, 128), 2), ((2, 256, 0, 64), 1)],
                         ids=["empty-batch", "no-query-heads"])
def test_empty_batch_or_heads_on_an_otherwise_eligible_input(shape_q, heads_kv):
    """Zero batch rows or zero query heads (S_q >= 128, bf16, D64/128: the Hopper kernels' scope otherwise) give
    empty outputs and zero gradients; the Hopper path's copy-engine descriptors refused a size-0 dim (an
    AssertionError inside Triton before session 20)."""
    b, s, _, d = shape_q
    q = torch.randn(shape_q, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(b, s, heads_kv, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    assert hopper.unsupported(q, k, v, None, None, None, None, 0.0, True, False) == "no batch rows or no query heads"
    out, lse = M.attention(q, k, v, backend="triton", causal=True, alibi_slopes=None, return_lse=True)
    assert out.shape == q.shape and lse.shape == (b, shape_q[2], s)
    out.sum().backward()
    for t in (q, k, v):
        assert t.grad.shape == t.shape and not t.grad.abs().sum()


def test_non_deterministic_backward_changes_only_the_order_of_dq_sums():
    """deterministic=False on the Hopper path, as many KV heads as query heads: dQ comes from the dK/dV
    kernel (its consumers at D128; float32 bulk reductions in no fixed order); dK and dV come from the same
    consumers as the reproducible backward's, bitwise."""
    (q, k, v), kw = make_inputs(FUSED_DQ_CASES[0], dtype=torch.bfloat16, device="cuda", requires_grad=True)
    dout = torch.randn(q.shape, device="cuda", dtype=torch.bfloat16)
    assert hopper.unsupported(q, k, v, None, None, None, None, 0.0, True, False, dout) is None
    grads = [torch.autograd.grad(M.attention(q, k, v, backend="triton", deterministic=det, **kw), [q, k, v], dout)
             for det in (True, False)]
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=1e-2, atol=1e-2)
    for name, a, b in zip(["dk", "dv"], grads[0][1:], grads[1][1:]):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("case", [
    pytest.param(AttnCase(4, 4096, 4096, 8, 8, 128, causal=True, alibi=True), id="causal-32-key-blocks"),
    pytest.param(AttnCase(2, 2048, 2048, 16, 4, 128, causal=True, alibi=True), id="gqa-16-4"),
    pytest.param(AttnCase(2, 2000, 2000, 8, 8, 96, alibi=True), id="non-causal-d96-ragged"),
])
def test_first_write_dq_sums_match_zeroed_ones(monkeypatch, case):
    """Where the consumers form dQ, each 64-query block's first program stores its part into unzeroed float32 sums
    and the others add after its stores complete (hopper_dq): dQ matches the zeroed sums' up to the order of the
    additions, in every run, with many programs per block (a lost or early addition would be off by a whole
    program's part; a block nobody stored stays NaN-poisoned); dK and dV are bitwise the same."""
    monkeypatch.setattr(hopper, "REACH_MIN_KEYS", 1 << 62)  # (past ALiBi's reach the first program skips blocks)
    (q, k, v), kw = make_inputs(case, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    dout = torch.randn(q.shape, device="cuda", dtype=torch.bfloat16)
    assert hopper_dkdv.first_write_dq(case.head_dim, False, False)

    def grads():
        return torch.autograd.grad(M.attention(q, k, v, backend="triton", deterministic=None, **kw), [q, k, v], dout)

    monkeypatch.setattr(hopper, "FIRST_WRITE_DQ", False)
    zeroed = grads()
    monkeypatch.setattr(hopper, "FIRST_WRITE_DQ", True)
    scale = zeroed[0].float().abs().max()
    for _ in range(3):
        dq, dk, dv = grads()
        assert not dq.isnan().any()
        assert (dq.float() - zeroed[0].float()).abs().max() <= 4e-3 * scale
        assert torch.equal(dk, zeroed[1]) and torch.equal(dv, zeroed[2])


@pytest.mark.parametrize("heads", [1, 2, 4], ids=["1-head-per-program", "2-heads-per-program", "4-heads-per-program"])
def test_grouped_heads_with_fused_dq_keep_dk_dv_reproducible(monkeypatch, heads):
    """Grouped heads with dQ formed in the dK/dV kernel: a group's query heads split over programs whose float32 dK, dV
    partials are added after the kernel in a fixed order, so dK and dV are bitwise the same between runs
    (dQ is not) and agree with the reproducible split's."""
    monkeypatch.setattr(hopper, "FUSED_GROUP_HEADS", heads)
    (q, k, v), kw = make_inputs(CASES[0], dtype=torch.bfloat16, device="cuda", requires_grad=True)
    assert q.shape[2] == 4 * k.shape[2]
    dout = torch.randn(q.shape, device="cuda", dtype=torch.bfloat16)
    runs = [torch.autograd.grad(M.attention(q, k, v, backend="triton", deterministic=False, **kw), [q, k, v], dout)
            for _ in range(2)]
    split = torch.autograd.grad(M.attention(q, k, v, backend="triton", deterministic=True, **kw), [q, k, v], dout)
    for name, a, b, ref in zip(["dq", "dk", "dv"], *runs, split):
        if name != "dq":
            assert torch.equal(a, b), name
        torch.testing.assert_close(a, ref, rtol=1e-2, atol=1e-2, msg=name)


def _reach_keys(q, k, slopes, scale):
    """Per head, the reach of reach.py's bound in keys (the kernels round it up): past it every probability is
    below 2^-128."""
    q_max = q.float().norm(dim=-1).amax(dim=1)[0]  # (H,)
    k_max = k.float().norm(dim=-1).amax(dim=1)[0].repeat_interleave(q.shape[2] // k.shape[2])
    c, a = scale * hopper.LOG2E, slopes.float() * hopper.LOG2E
    return (reach.VANISH2.value + 2 * reach.NORM_SLACK.value * c * q_max * k_max) / a


def _mpt_row(slopes, s_k):
    """MPT's (1, H, 1, S_k) ALiBi bias row, float32: slope * (j - (S_k - 1))."""
    return (slopes.float().view(1, -1, 1, 1) * (torch.arange(s_k, device=slopes.device) - (s_k - 1))).view(
        1, -1, 1, s_k)


@pytest.mark.parametrize("what, d, scale", [("slopes", 64, None), ("slopes", 128, None), ("bias-row", 64, None),
                                             ("bias-row", 128, None), ("bias-row", 64, 0.0)],
                         ids=["slopes-D64", "slopes-D128", "bias-row-D64", "bias-row-D128", "bias-row-D64-scale-0"])
def test_causal_alibi_never_reads_key_blocks_past_its_reach(monkeypatch, what, d, scale):
    """Causal ALiBi with a steep slope, from slopes or as MPT's bias tensor: the first key block's V is NaN. Its
    probabilities underflow for rows far enough behind it, so those rows must not read it at all (finite, and the
    reference without that block), while rows within its reach, and every row of a head whose slope reaches past the
    sequence, read it (NaN, as in the reference). A kernel that reads every block makes every row NaN. A zero scale
    takes the bias row scaled first, its slices read ahead from the tile's first block."""
    s, n_heads = 3000, 2
    gen = torch.Generator(device="cuda").manual_seed(3)
    q, k, v = (torch.randn(1, s, n_heads, d, device="cuda", generator=gen).to(torch.bfloat16) for _ in range(3))
    slopes = torch.tensor([0.5, 2.0 ** -8], device="cuda")
    far_off = _reach_keys(q, k, slopes, d ** -0.5 if scale is None else scale)
    assert far_off[0] < 1000 and far_off[1] > s
    v_nan = v.clone()
    v_nan[:, :128] = float("nan")
    monkeypatch.setattr(hopper, "REACH_MIN_KEYS", 1024)
    kw = dict(causal=True, softmax_scale=scale,
              **({"alibi_slopes": slopes} if what == "slopes" else {"attn_bias": _mpt_row(slopes, s)}))
    out = M.attention(q, k, v_nan, backend="triton", **kw)
    # past the reach of the block's last key from every row of its tile, and the slack of a bias row's rounding
    far = int(far_off[0]) + 128 + 192 + 8
    assert out[0, far:, 0].isfinite().all()
    assert out[0, :int(far_off[0]), 0].isnan().all()
    assert out[0, :, 1].isnan().all()
    v_zero = v.clone()
    v_zero[:, :128] = 0
    ref, _ = reference_attention(q.double(), k.double(), v_zero.double(), **kw)
    low, _ = reference_attention(q, k, v_zero, compute_dtype=torch.bfloat16, **kw)
    assert_close_to_reference("rows past the reach", out[:, far:, :1], ref[:, far:, :1], low[:, far:, :1])


@pytest.mark.parametrize("d", [64, 128, 96], ids=["D64", "D128", "D96-tail"])
def test_packed_forward_never_reads_key_blocks_past_the_reach(monkeypatch, d):
    """``attention_varlen`` on the Hopper forward with a steep causal ALiBi slope: sequences of 3072 queries, 2200 on
    3000 keys (a chunked prefill) and 500, one row of norm maxima per head over every token. The two long sequences'
    first key block's V is NaN: the steep head's rows far enough behind it stay finite (the block was skipped) and
    match the float64 reference without it, its rows within the reach are NaN, and so is every row of the flat head;
    a forward computing every block gives the same finite rows. (The first sequence's keys end on a block boundary:
    a sequence's last key block also holds the next one's first keys, masked, whose V a NaN would reach through 0 x
    NaN: docs/errors.md.)"""
    q, k, v, cu_q, cu_k = make_varlen_inputs([3072, 2200, 500], [3072, 3000, 500], 2, 2, d, torch.bfloat16, "cuda",
                                             seed=3)
    slopes = torch.tensor([0.5, 2.0 ** -8], device="cuda")
    far_off = _reach_keys(q.unsqueeze(0), k.unsqueeze(0), slopes, d ** -0.5)
    assert far_off[0] < 1000 and far_off[1] > 3072
    v_nan, v_zero = v.clone(), v.clone()
    for start in cu_k[:2].tolist():
        v_nan[start:start + 128] = float("nan")
        v_zero[start:start + 128] = 0
    kw = dict(backend="triton", causal=True, alibi_slopes=slopes)
    monkeypatch.setattr(hopper, "REACH_MIN_KEYS", 1024)
    out = M.attention_varlen(q, k, v_nan, cu_q, cu_k, 3072, 3072, **kw)
    far = int(far_off[0]) + 128 + 128  # past the reach of the block's last key from every row of its tile
    seq0, seq1 = out[:3072, 0], out[3072:5272, 0]
    far1 = max(far - 800, 0)  # (seq1's first query sits at key 800)
    assert seq0[far:].isfinite().all() and seq1[far1:].isfinite().all()
    assert seq0[:int(far_off[0])].isnan().all() and out[:5272, 1].isnan().all()
    ref, _ = reference_attention_varlen(q.double(), k.double(), v_zero.double(), cu_q, cu_k, causal=True,
                                        alibi_slopes=slopes)
    low, _ = reference_attention_varlen(q, k, v_zero, cu_q, cu_k, causal=True, alibi_slopes=slopes,
                                        compute_dtype=torch.bfloat16)
    rows = torch.cat([torch.arange(far, 3072), torch.arange(3072 + far1, 5272)]).cuda()
    assert_close_to_reference("rows past the reach", out[rows, :1], ref[rows, :1], low[rows, :1])
    monkeypatch.setattr(hopper, "REACH_MIN_KEYS", 1 << 62)
    every = M.attention_varlen(q, k, v_zero, cu_q, cu_k, 3072, 3072, **kw)
    monkeypatch.setattr(hopper, "REACH_MIN_KEYS", 1024)
    skipped = M.attention_varlen(q, k, v_zero, cu_q, cu_k, 3072, 3072, **kw)
    diff = (skipped.float() - every.float()).abs()
    assert (diff <= every.float().abs() * 2.0 ** -7 + 1e-6).all(), diff.max()


@pytest.mark.parametrize("d", [64, 128])
def test_causal_alibi_reach_keeps_far_keys_whose_scores_outweigh_the_slope(d):
    """One early key aligned with every query and forty times longer than the others: ALiBi's penalty does
    not outweigh its score, so every row attends to it. The reach grows with the heads' norms (reach.py), so the
    kernel reads its block; a reach from the slope alone would skip it."""
    s, n_heads = 2048, 4
    gen = torch.Generator(device="cuda").manual_seed(4)
    base = torch.randn(d, device="cuda", generator=gen)
    q = (base + 0.3 * torch.randn(1, s, n_heads, d, device="cuda", generator=gen)).to(torch.bfloat16)
    k, v = (torch.randn(1, s, n_heads, d, device="cuda", generator=gen).to(torch.bfloat16) for _ in range(2))
    k[0, 5] = (40 * base).to(torch.bfloat16)
    slopes = M.gen_slopes(n_heads, return_1d=True, device="cuda")
    assert (_reach_keys(q, k, slopes, d ** -0.5) > s).all()
    _assert_forward_matches_reference(q, k, v, causal=True, alibi_slopes=slopes)


@pytest.mark.parametrize("case", [AttnCase(2, 4096, 4096, 8, 2, 64, causal=True, alibi=True),
                                  AttnCase(1, 1500, 3000, 8, 8, 128, causal=True, alibi=True),
                                  AttnCase(2, 2000, 2000, 16, 16, 96, causal=True, alibi=True)],
                         ids=lambda c: c.id())
def test_skipping_key_blocks_past_the_reach_computes_what_every_block_computes(monkeypatch, case):
    """The same forward with the blocks past causal ALiBi's reach skipped and with every visible block computed:
    the skipped probabilities are 0 either way, so the outputs agree to float32's rounding before the cast (one
    unit in the last place of q's dtype) and so do the log-sum-exps; also against the float64 reference."""
    (q, k, v), kw = make_inputs(case, dtype=torch.bfloat16, device="cuda")
    monkeypatch.setattr(hopper, "REACH_MIN_KEYS", 1 << 62)
    every, every_lse = M.attention(q, k, v, backend="triton", return_lse=True, **kw)
    monkeypatch.setattr(hopper, "REACH_MIN_KEYS", 1024)
    out, lse = M.attention(q, k, v, backend="triton", return_lse=True, **kw)
    diff = (out.float() - every.float()).abs()
    assert (diff <= every.float().abs() * 2.0 ** -7 + 1e-6).all(), diff.max()
    torch.testing.assert_close(lse, every_lse, rtol=0, atol=1e-5)
    _assert_forward_matches_reference(q, k, v, **kw)


@pytest.mark.parametrize("what", ["slopes", "bias-row"])
@pytest.mark.parametrize("d, deterministic", [(64, None), (128, None), (128, True)],
                         ids=["D64-fused-dq", "D128-fused-dq", "D128-split"])
def test_causal_alibi_backward_never_reads_query_blocks_past_its_reach(monkeypatch, d, deterministic, what):
    """The backward's key blocks visit only the query blocks within their reach (from slopes or MPT's bias tensor):
    dO of the last 128 queries is NaN, so every key block that reads them gets NaN dK and dV (those within the steep
    head's reach, and all of the head whose slope reaches past the sequence), while the steep head's key blocks far
    before them stay finite and match the float64 reference's gradients with those dO rows zeroed."""
    s, n_heads = 3000, 2
    gen = torch.Generator(device="cuda").manual_seed(6)
    q, k, v = (torch.randn(1, s, n_heads, d, device="cuda", generator=gen).to(torch.bfloat16).requires_grad_()
               for _ in range(3))
    slopes = torch.tensor([0.5, 2.0 ** -8], device="cuda")
    far_off = _reach_keys(q.detach(), k.detach(), slopes, d ** -0.5)
    assert far_off[0] < 1000 and far_off[1] > s
    dout = torch.randn(q.shape, device="cuda", generator=gen).to(torch.bfloat16)
    dout_nan = dout.clone()
    dout_nan[:, -128:] = float("nan")
    monkeypatch.setattr(hopper, "REACH_MIN_KEYS", 1024)
    kw = dict(causal=True, **({"alibi_slopes": slopes} if what == "slopes" else {"attn_bias": _mpt_row(slopes, s)}))
    out = M.attention(q, k, v, backend="triton", deterministic=deterministic, **kw)
    dq, dk, dv = torch.autograd.grad(out, [q, k, v], dout_nan)
    reach_keys = int(far_off[0])
    # key blocks ending at least the reach before the first NaN row (a bias row's query ends: multiples of ROW_STEP)
    far = s - 128 - reach_keys - 256 - reach.ROW_STEP
    for name, g in (("dk", dk), ("dv", dv)):
        assert g[0, :far, 0].isfinite().all(), name
        assert g[0, s - 128 - reach_keys:, 0].isnan().all(), name
        assert g[0, :, 1].isnan().all(), name
    assert dq[0, :s - 128, 0].isfinite().all() and dq[0, -128:].isnan().all()
    dout_zero = dout.clone()
    dout_zero[:, -128:] = 0
    refs = []
    for dtype in (torch.float64, torch.bfloat16):
        xs = [x.detach().to(dtype).requires_grad_() for x in (q, k, v)]
        ref, _ = reference_attention(*xs, **kw, compute_dtype=dtype)
        refs.append(torch.autograd.grad(ref, xs, dout_zero.to(dtype)))
    for i, name in ((1, "dk"), (2, "dv")):
        got = (dk, dv)[i - 1][:, :far, :1]
        assert_close_to_reference(name, got, refs[0][i][:, :far, :1], refs[1][i][:, :far, :1])


@pytest.mark.parametrize("d", [64, 128, 96], ids=["D64", "D128", "D96-tail"])
def test_packed_backward_never_reads_query_blocks_past_the_reach(monkeypatch, d):
    """``attention_varlen``'s backward on the Hopper dK/dV kernel (with the dQ sums, as packed sequences take it):
    sequences of 3000 queries, 2200 on 3000 keys and 500. dO of each sequence's last 128 queries is NaN: the steep
    head's key blocks far before them stay finite in both long sequences and match the float64 reference with those
    rows zeroed, its key blocks within their reach are NaN, and so is every key of the flat head. With dO clean the
    gradients equal those computing every block."""
    q, k, v, cu_q, cu_k = make_varlen_inputs([3000, 2200, 500], [3000, 3000, 500], 2, 2, d, torch.bfloat16, "cuda",
                                             seed=6, requires_grad=True)
    gen = torch.Generator(device="cuda").manual_seed(6)
    slopes = torch.tensor([0.5, 2.0 ** -8], device="cuda")
    far_off = _reach_keys(q.detach().unsqueeze(0), k.detach().unsqueeze(0), slopes, d ** -0.5)
    assert far_off[0] < 1000 and far_off[1] > 3000
    dout = torch.randn(q.shape, device="cuda", generator=gen).bfloat16()
    dout_nan, dout_zero = dout.clone(), dout.clone()
    for end in cu_q[1:].tolist():
        dout_nan[end - 128:end] = float("nan")
        dout_zero[end - 128:end] = 0

    def grads(min_keys, d_out):
        monkeypatch.setattr(hopper, "REACH_MIN_KEYS", min_keys)
        out = M.attention_varlen(q, k, v, cu_q, cu_k, 3000, 3000, backend="triton", causal=True, alibi_slopes=slopes)
        return torch.autograd.grad(out, [q, k, v], d_out)

    dq, dk, dv = grads(1024, dout_nan)
    reach_keys = int(far_off[0])
    far = 3000 - 128 - reach_keys - 256  # key blocks ending at least the reach before the first NaN row
    for name, g in (("dk", dk), ("dv", dv)):
        for start in (0, 3000):  # both long sequences: their NaN rows sit at key positions 2872-2999
            assert g[start:start + far, 0].isfinite().all(), name
            assert g[start + 3000 - 128 - reach_keys:start + 3000, 0].isnan().all(), name
        assert g[:, 1].isnan().all(), name
    assert dq[:3000 - 128, 0].isfinite().all() and dq[3000 - 128:3000].isnan().all()
    refs = []
    for dtype in (torch.float64, torch.bfloat16):
        xs = [x.detach().to(dtype).requires_grad_() for x in (q, k, v)]
        ref, _ = reference_attention_varlen(*xs, cu_q, cu_k, causal=True, alibi_slopes=slopes, compute_dtype=dtype)
        refs.append(torch.autograd.grad(ref, xs, dout_zero.to(dtype)))
    rows = torch.cat([torch.arange(0, far), torch.arange(3000, 3000 + far)]).cuda()
    for i, name in ((1, "dk"), (2, "dv")):
        got = (dk, dv)[i - 1][rows, :1]
        assert_close_to_reference(name, got, refs[0][i][rows, :1], refs[1][i][rows, :1])
    every, skipped = grads(1 << 62, dout_zero), grads(1024, dout_zero)
    for name, a, b in zip(["dq", "dk", "dv"], skipped, every):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2, msg=name)


@pytest.mark.parametrize("case, deterministic", [
    pytest.param(AttnCase(2, 2048, 2048, 8, 8, 128, causal=True, alibi=True), None, id="D128-fused-dq"),
    pytest.param(AttnCase(1, 2048, 2048, 8, 2, 128, causal=True, alibi=True), None, id="D128-GQA-split-heads"),
    pytest.param(AttnCase(2, 2048, 2048, 8, 8, 64, causal=True, alibi=True), None, id="D64-fused-dq"),
    pytest.param(AttnCase(1, 1500, 2500, 8, 8, 128, causal=True, alibi=True), True, id="D128-split-chunked"),
    pytest.param(AttnCase(1, 2000, 2000, 16, 16, 96, causal=True, alibi=True), None, id="D96-tail"),
])
def test_backward_past_the_reach_matches_float64_reference_and_every_block(monkeypatch, case, deterministic):
    """Gradients with the query blocks past causal ALiBi's reach skipped: against the float64 reference, and
    against the same backward computing every visible block (the skipped probabilities are 0 either way)."""
    (q, k, v), kw = make_inputs(case, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    dout = torch.randn(q.shape, device="cuda", dtype=torch.bfloat16)

    def run(min_keys):
        monkeypatch.setattr(hopper, "REACH_MIN_KEYS", min_keys)
        out = M.attention(q, k, v, backend="triton", deterministic=deterministic, **kw)
        return out, torch.autograd.grad(out, [q, k, v], dout)

    every = run(1 << 62)[1]
    out, grads = run(1024)
    for name, a, b in zip(["dq", "dk", "dv"], grads, every):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2, msg=name)
    assert_gradients_close_to_reference(out, grads, [q, k, v], kw, dout, torch.bfloat16)


@pytest.mark.parametrize("b, s_q, s_k, h, h_kv, d, deterministic", [
    pytest.param(2, 4096, 4096, 8, 2, 64, None, id="D64-GQA-fused-dq"),
    pytest.param(1, 1500, 3000, 8, 8, 128, None, id="D128-chunked-fused-dq"),
    pytest.param(1, 2048, 2048, 8, 2, 128, True, id="D128-GQA-split"),
    pytest.param(1, 2000, 2000, 16, 16, 96, None, id="D96-tail"),
])
def test_bias_row_past_its_reach_matches_every_block_and_float64_reference(monkeypatch, b, s_q, s_k, h, h_kv, d,
                                                                           deterministic):
    """MPT's bias row with the blocks past its reach skipped, forward and backward: against the same calls
    computing every visible block (the skipped probabilities are 0 either way) and against the float64 reference."""
    gen = torch.Generator(device="cuda").manual_seed(14)
    q = torch.randn(b, s_q, h, d, device="cuda", generator=gen).to(torch.bfloat16).requires_grad_()
    k, v = (torch.randn(b, s_k, h_kv, d, device="cuda", generator=gen).to(torch.bfloat16).requires_grad_()
            for _ in range(2))
    kw = dict(causal=True, attn_bias=_mpt_row(M.gen_slopes(h, return_1d=True, device="cuda"), s_k))
    dout = torch.randn(q.shape, device="cuda", dtype=torch.bfloat16)

    def run(min_keys):
        monkeypatch.setattr(hopper, "REACH_MIN_KEYS", min_keys)
        out, lse = M.attention(q, k, v, backend="triton", deterministic=deterministic, return_lse=True, **kw)
        return out, lse, torch.autograd.grad(out, [q, k, v], dout)

    every, every_lse, every_grads = run(1 << 62)
    out, lse, grads = run(1024)
    diff = (out.float() - every.float()).abs()
    assert (diff <= every.float().abs() * 2.0 ** -7 + 1e-6).all(), diff.max()
    torch.testing.assert_close(lse, every_lse, rtol=0, atol=1e-5)
    for name, x, y in zip(["dq", "dk", "dv"], grads, every_grads):
        torch.testing.assert_close(x, y, rtol=2e-2, atol=2e-2, msg=name)
    assert_gradients_close_to_reference(out, grads, [q, k, v], kw, dout, torch.bfloat16)


@pytest.mark.parametrize("what, deterministic", [("slopes", None), ("bias-row", None), ("slopes", True)],
                         ids=["slopes", "bias-row", "slopes-reproducible"])
def test_a_training_step_reads_the_reach_norms_once(monkeypatch, what, deterministic):
    """The eager autograd path hands the forward's norm maxima to the backward: one norms pass per forward+backward
    (a bias row's table is still made per pass); the gradients as the float64 reference's."""
    monkeypatch.setattr(hopper, "REACH_MIN_KEYS", 1024)
    gen = torch.Generator(device="cuda").manual_seed(16)
    q, k, v = (torch.randn(1, 2048, h, 128, device="cuda", generator=gen).to(torch.bfloat16).requires_grad_()
               for h in (8, 2, 2))
    slopes = M.gen_slopes(8, return_1d=True, device="cuda")
    kw = dict(causal=True, **({"alibi_slopes": slopes} if what == "slopes" else {"attn_bias": _mpt_row(slopes, 2048)}))
    dout = torch.randn(q.shape, device="cuda", dtype=torch.bfloat16)

    def step():
        out = M.attention(q, k, v, backend="triton", deterministic=deterministic, **kw)
        return out, torch.autograd.grad(out, [q, k, v], dout)

    launches = {name: count for _, count, name in profile_kernels(step)}
    assert sum(n for name, n in launches.items() if "row_norm_max_kernel" in name) == 1, launches
    assert sum(n for name, n in launches.items() if "row_reach_kernel" in name) == (2 if what == "bias-row" else 0)
    out, grads = step()
    assert_gradients_close_to_reference(out, grads, [q, k, v], kw, dout, torch.bfloat16)


@pytest.mark.parametrize("shape", [(1, 4, 1, 512), (2, 4, 512, 512)], ids=["bias-row", "bias-matrix"])
def test_nan_in_a_bias_reaches_exactly_the_rows_that_see_it(hopper_forward_bias_shapes, shape):
    """On the Hopper forward (a bias row through its extension product, a matrix with K's tiles): a NaN bias value is
    not a soft mask; the rows that see it are NaN, the others match the float64 reference."""
    (q, k, v), kw = make_inputs(AttnCase(2, 512, 512, 4, 2, 64, causal=True), dtype=torch.bfloat16, device="cuda")
    bias = torch.randn(shape, device="cuda", dtype=torch.float32 if shape[2] == 1 else torch.bfloat16)
    bias[..., 300] = float("nan")
    out = M.attention(q, k, v, backend="triton", attn_bias=bias, **kw)
    assert hopper_forward_bias_shapes == [shape]
    ref, _ = reference_attention(q.double(), k.double(), v.double(), attn_bias=bias.double(), **kw)
    low, _ = reference_attention(q, k, v, attn_bias=bias, compute_dtype=torch.bfloat16, **kw)
    assert torch.equal(out.isnan(), ref.isnan()) and ref[:, 300:].isnan().all()
    assert_close_to_reference("rows before the NaN key", out[:, :300], ref[:, :300], low[:, :300])


@pytest.mark.parametrize("head_dim", [128, 64])
def test_packed_clears_keep_a_sequences_nan_in_that_sequence(monkeypatch, head_dim):
    """``hopper.PACKED_CLEARS``: packed sequences on the Hopper kernels that clear the rows past each sequence's end
    before a product reads them. NaN in the V (and K) of a sequence's first keys then reaches only that sequence's
    rows, forward and backward: the previous sequence's outputs and gradients stay finite and match the general
    kernels' (docs/errors.md; without the clears the neighbour's V enters P V with weight 0)."""
    monkeypatch.setattr(hopper, "PACKED_CLEARS", True)
    calls = []
    real = hopper.run_forward
    monkeypatch.setattr(hopper, "run_forward", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    lens = [1000, 700, 301]
    q, k, v, cu_q, cu_k = make_varlen_inputs(lens, lens, 4, 2, head_dim, dtype=torch.bfloat16, device="cuda")
    with torch.no_grad():
        v[1000:1003] = float("nan")
        k[1001] = float("nan")
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    slopes = M.gen_slopes(4, return_1d=True, device="cuda")
    out = M.attention_varlen(q, k, v, cu_q, cu_k, 1000, 1000, backend="triton", causal=True, alibi_slopes=slopes)
    grads = torch.autograd.grad(out[:1000].float().sum(), (q, k, v))
    assert calls, "the packed call did not take the Hopper forward"
    assert out[:1000].isfinite().all() and out[1000:1700].isnan().any()
    assert all(g[:1000].isfinite().all() for g in grads)
    qq, kk, vv = (x.detach()[:1000].clone().requires_grad_() for x in (q, k, v))
    first = M.attention_varlen(qq, kk, vv, cu_q[:2], cu_k[:2], 1000, 1000, backend="triton", causal=True,
                               alibi_slopes=slopes)
    ref_grads = torch.autograd.grad(first.float().sum(), (qq, kk, vv))
    torch.testing.assert_close(out[:1000], first, rtol=0, atol=0)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g[:1000], r, rtol=2e-2, atol=2e-2)
