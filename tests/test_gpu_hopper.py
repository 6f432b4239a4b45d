"""The Hopper kernels (Gluon, sm_90; the forward and the dK/dV kernel): where they apply, that they compute
what the general kernels and the float64 reference compute (ALiBi, packed sequences, head dims, dQ in the dK/dV
kernel, key padding, determinism). Bias tensors on these kernels: ``test_gpu_hopper_bias.py``; causal ALiBi's reach:
``test_gpu_hopper_reach.py``. Runs on the GPU machine (pytest -m gpu); skipped elsewhere."""

import math

import pytest
import torch

import mpt_attention as M
from mpt_attention.impl.triton import hopper, hopper_dkdv, key_padding
from mpt_attention.impl.triton.reach import REACH_ROW, REACH_SLOPES, REACH_TABLE
from mpt_attention.testing import (
    AttnCase, assert_close_to_reference, assert_forward_matches_reference, assert_gradients_close_to_reference,
    capture_cuda_graph, make_inputs, make_varlen_inputs, reference_attention, reference_attention_varlen,
)

pytestmark = [pytest.mark.gpu, pytest.mark.hopper]


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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id())
def test_hopper_forward_matches_float64_reference(case, dtype):
    (q, k, v), kw = make_inputs(case, dtype=dtype, device="cuda")
    assert hopper.unsupported(q, k, v, None, None, None, None, 0.0, case.causal, False) is None
    assert_forward_matches_reference(q, k, v, **kw)


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
    assert_forward_matches_reference(q, k, v, causal=causal)


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
    assert_forward_matches_reference(q, k, v, softmax_scale=scale, **kw)


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
    assert_forward_matches_reference(q, k, v, **kw)
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
    assert_forward_matches_reference(q, k, v, **kw)
    out = M.attention(q, k, v, backend="triton", deterministic=deterministic, **kw)
    dout = torch.randn_like(out).transpose(1, 2).contiguous().transpose(1, 2)
    grads = torch.autograd.grad(out, [q, k, v], dout)
    # D64's reproducible backward is the general kernels' (hopper.BWD_HEAD_DIMS)
    expected = [] if deterministic and case.head_dim == 64 else [(False, not deterministic, False)]
    assert hopper_dkdv_launches == expected
    assert [g.stride() for g in grads] == [x.stride() for x in (q, k, v)]
    assert_gradients_close_to_reference(out, grads, [q, k, v], kw, dout, torch.bfloat16)


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


@pytest.mark.parametrize("group", [1, 3, 8], ids=["a-group-per-head", "groups-of-3-of-8-heads", "one-group"])
def test_hopper_forward_runs_every_tile_in_any_head_grouping(monkeypatch, group):
    # the grid's order (hopper_tiles.tile_order): longest tiles first within groups of heads, the one
    # smaller group first; 3 query tiles by 8 (batch, head) rows here
    case = AttnCase(2, 300, 300, 4, 2, 64, causal=True, alibi=True)
    (q, k, v), kw = make_inputs(case, dtype=torch.bfloat16, device="cuda")
    per_head = 2 * k[0, :, 0].numel() * k.element_size() * k.shape[2] / q.shape[2]  # K and V per query head
    monkeypatch.setattr(hopper, "L2_GROUP_BYTES", per_head * group)
    assert hopper.heads_per_group(k, q.shape[2], 8) == group
    assert_forward_matches_reference(q, k, v, **kw)


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
        assert_forward_matches_reference(q, k, v, **kw, **extra)


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


@pytest.mark.parametrize("case, bias_row", [
    pytest.param(AttnCase(4, 1024, 1024, 8, 8, 128, causal=True, alibi=True), False, id="consumers-form-dq"),
    pytest.param(AttnCase(3, 777, 777, 8, 8, 64, causal=True, alibi=True), False, id="dq-warpgroup-zeroed-sums"),
    pytest.param(AttnCase(2, 1000, 1000, 4, 4, 128, causal=True, alibi=True), True, id="bias-row-scaled-do"),
])
def test_backward_as_the_delta_kernels_programmatic_dependent(monkeypatch, case, bias_row):
    """``hopper.PDL``: the dK/dV kernel's programs start before the delta kernel has finished and wait for its row
    terms (and the zeroed sums or sync words, dO's scaled rows) in-kernel: dK and dV as with the switch off, bitwise,
    dQ up to its sums' order, and every gradient close to the float64 reference. Many steps in a row, so that some
    programs do start early."""
    monkeypatch.setattr(hopper, "REACH_MIN_KEYS", 1 << 62)  # every block: no launch between the two kernels
    (q, k, v), kw = make_inputs(case, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    if bias_row:
        _bias_row(kw, case.s_k, None)
    dout = torch.randn(q.shape, device="cuda", dtype=torch.bfloat16)
    made, real_plan = [], hopper_dkdv.dkdv_plan
    monkeypatch.setattr(hopper_dkdv, "dkdv_plan", lambda *args: made.append(real_plan(*args)) or made[-1])
    runs = {}
    for pdl in (False, True):
        monkeypatch.setattr(hopper, "PDL", pdl)
        out = M.attention(q, k, v, backend="triton", **kw)
        for _ in range(8):
            runs[pdl] = torch.autograd.grad(out, [q, k, v], dout, retain_graph=True)
    assert [p.launch.kwargs.get("PDL", False) for p in made] == [False, True]
    torch.testing.assert_close(runs[True][0], runs[False][0], rtol=1e-2, atol=1e-2)
    for name, a, b in zip(["dk", "dv"], runs[False][1:], runs[True][1:]):
        assert torch.equal(a, b), name
    assert_gradients_close_to_reference(out, runs[True], [q, k, v], kw, dout, torch.bfloat16)


def _bias_row(kw, s_k, kind):
    """``kw``'s slopes as MPT's (1, H, 1, S_k) bias row instead; ``holes``: keys 700-899 removed (-inf), so the key
    blocks holding them end their queries at once; ``dominant``: key 5 scores 0 like the last, so the tables end
    the early queries' diagonal blocks before them and only the first key block visits them."""
    slopes = kw.pop("alibi_slopes")
    row = slopes.view(1, -1, 1, 1) * (torch.arange(s_k, device=slopes.device) - (s_k - 1))
    if kind == "holes":
        row[..., 700:900] = float("-inf")
    elif kind == "dominant":
        row[..., 5] = 0.0
    kw["attn_bias"] = row.to(torch.bfloat16)


@pytest.mark.parametrize("case, reach, row", [
    pytest.param(AttnCase(4, 4096, 4096, 8, 8, 128, causal=True, alibi=True), False, None, id="causal-32-key-blocks"),
    pytest.param(AttnCase(2, 2048, 2048, 16, 4, 128, causal=True, alibi=True), False, None, id="gqa-16-4"),
    pytest.param(AttnCase(2, 2000, 2000, 8, 8, 96, alibi=True), False, None, id="non-causal-d96-ragged"),
    pytest.param(AttnCase(2, 4096, 4096, 8, 8, 128, causal=True, alibi=True), True, None, id="causal-reach"),
    pytest.param(AttnCase(2, 2048, 2048, 16, 4, 128, causal=True, alibi=True), True, None, id="gqa-16-4-reach"),
    pytest.param(AttnCase(1, 3000, 3000, 8, 8, 96, causal=True, alibi=True), True, None, id="causal-reach-d96-ragged"),
    pytest.param(AttnCase(2, 4096, 4096, 8, 8, 128, causal=True, alibi=True), True, "mpt", id="bias-row-reach"),
    pytest.param(AttnCase(2, 2048, 2048, 16, 4, 128, causal=True, alibi=True), True, "holes",
                 id="gqa-16-4-bias-row-reach-holes"),
    pytest.param(AttnCase(1, 3000, 3000, 8, 8, 96, causal=True, alibi=True), True, "dominant",
                 id="bias-row-reach-dominant-key-d96-ragged"),
])
def test_first_write_dq_sums_match_zeroed_ones(monkeypatch, case, reach, row):
    """Where the consumers form dQ, each 64-query block's first program stores its part into unzeroed float32 sums
    and the others add after its stores complete (hopper_dq): dQ matches the zeroed sums' up to the order of the
    additions, in every run, with many programs per block (a lost or early addition would be off by a whole
    program's part; a block nobody stored stays NaN-poisoned); dK and dV are bitwise the same. Also past causal
    ALiBi's reach (``reach``, the shipped thresholds), from slopes (the norms' bound, or at 2048 and 3000 keys the
    forward's table) or a bias row's (``row``: its table, or at 2048 and 3000 keys the forward's), where each key
    block visits only the query blocks within it and a query block's first program can be any key block's."""
    if not reach:
        monkeypatch.setattr(hopper, "REACH_MIN_KEYS", 1 << 62)
    (q, k, v), kw = make_inputs(case, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    if row:
        _bias_row(kw, case.s_k, row)
    dout = torch.randn(q.shape, device="cuda", dtype=torch.bfloat16)
    assert hopper_dkdv.first_write_dq(case.head_dim, False, False)
    made, real_plan = [], hopper_dkdv.dkdv_plan
    monkeypatch.setattr(hopper_dkdv, "dkdv_plan", lambda *args: made.append(real_plan(*args)) or made[-1])

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
    # (slopes or a bias row over 1024-3071 keys: the forward's table, hopper.forward_table_applies)
    table = hopper.REACH_MIN_KEYS // 4 <= case.s_k < 3 * (hopper.REACH_MIN_KEYS // 4)
    want = (REACH_TABLE if table else REACH_ROW if row else REACH_SLOPES) if reach else 0
    assert [(p.launch.kwargs["FIRST_WRITE"], p.launch.kwargs["REACH"]) for p in made] == [(False, want), (True, want)]


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
