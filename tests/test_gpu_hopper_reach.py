"""Causal ALiBi's reach on the Hopper kernels (Gluon, sm_90; ``reach.py``): key blocks (forward) and query blocks
(dK/dV) past every query's reach are never read, and skipping them computes what every block and the float64
reference compute, from slopes or from a bias row, dense and packed. Runs on the GPU machine (pytest -m gpu);
skipped elsewhere."""

import pytest
import torch

import mpt_attention as M
from mpt_attention.impl.triton import hopper, reach
from mpt_attention.testing import (
    AttnCase, assert_agrees_with_every_block, assert_close_to_reference, assert_forward_matches_reference,
    assert_gradients_close_to_reference, make_inputs, make_varlen_inputs, profile_kernels, reference_attention,
    reference_attention_varlen,
)

pytestmark = [pytest.mark.gpu, pytest.mark.hopper]


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


def _reach_keys(q, k, slopes, scale):
    """Per head, the reach of reach.py's bound in keys (the kernels round it up): past it every probability is
    below 2^-VANISH2 of the row's largest."""
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
    assert_agrees_with_every_block(skipped, every, v_zero)


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
    assert_forward_matches_reference(q, k, v, causal=True, alibi_slopes=slopes)


@pytest.mark.parametrize("case", [AttnCase(2, 4096, 4096, 8, 2, 64, causal=True, alibi=True),
                                  AttnCase(1, 1500, 3000, 8, 8, 128, causal=True, alibi=True),
                                  AttnCase(2, 2000, 2000, 16, 16, 96, causal=True, alibi=True)],
                         ids=lambda c: c.id())
def test_skipping_key_blocks_past_the_reach_computes_what_every_block_computes(monkeypatch, case):
    """The same forward with the blocks past causal ALiBi's reach skipped and with every visible block computed:
    the skipped probabilities are below 2^-48 of their rows' largest (reach.py), so the two differ only by the
    rounding of the rows' first computed blocks (``assert_agrees_with_every_block``; B2 S2000 D96 measured 33 outputs
    one or two units of bfloat16 apart, session 65); also against the float64 reference."""
    (q, k, v), kw = make_inputs(case, dtype=torch.bfloat16, device="cuda")
    monkeypatch.setattr(hopper, "REACH_MIN_KEYS", 1 << 62)
    every, every_lse = M.attention(q, k, v, backend="triton", return_lse=True, **kw)
    monkeypatch.setattr(hopper, "REACH_MIN_KEYS", 1024)
    out, lse = M.attention(q, k, v, backend="triton", return_lse=True, **kw)
    assert_agrees_with_every_block(out, every, v, lse, every_lse)
    assert_forward_matches_reference(q, k, v, **kw)


def _assert_far_keys_match_reference(q, k, v, dk, dv, dout, kw, far):
    """Head 0's dK and dV of keys ``[0, far)`` (those whose key blocks end their queries before the last 128 rows)
    against the reference's in float64 and bfloat16 with ``dout``'s last 128 rows zeroed."""
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
    _assert_far_keys_match_reference(q, k, v, dk, dv, dout, kw, far)


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
    against the same backward computing every visible block (the skipped probabilities are below 2^-48: reach.py)."""
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
    computing every visible block (the skipped probabilities are below 2^-48: reach.py) and against the float64
    reference."""
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
    assert_agrees_with_every_block(out, every, v, lse, every_lse)
    for name, x, y in zip(["dq", "dk", "dv"], grads, every_grads):
        torch.testing.assert_close(x, y, rtol=2e-2, atol=2e-2, msg=name)
    assert_gradients_close_to_reference(out, grads, [q, k, v], kw, dout, torch.bfloat16)


def _training_inputs(seed, batch, n_kv, head_dim, what):
    """A causal training step's inputs at 2048 keys, 8 query heads: q, k, v (bf16, needing gradients), the call's
    keywords (MPT's slopes, or its bias row: ``what``) and dO."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v = (torch.randn(batch, 2048, h, head_dim, device="cuda", generator=gen).to(torch.bfloat16).requires_grad_()
               for h in (8, n_kv, n_kv))
    slopes = M.gen_slopes(8, return_1d=True, device="cuda")
    kw = dict(causal=True, **({"alibi_slopes": slopes} if what == "slopes" else {"attn_bias": _mpt_row(slopes, 2048)}))
    return (q, k, v), kw, torch.randn(q.shape, device="cuda", dtype=torch.bfloat16)


@pytest.mark.parametrize("what", ["slopes", "bias-row"])
def test_only_a_training_step_skips_past_the_reach_at_2048_keys(what):
    """At the shipped thresholds and 2048 keys (REACH_MIN_KEYS / 2), a training step's forward, with slopes or MPT's
    bias row, writes the table its backward skips with (``hopper.forward_table_applies``), and no norms are read; a
    forward alone (no gradient needed) reads none and computes every block. Both as the float64 reference's."""
    assert hopper.REACH_MIN_KEYS // 2 <= 2048 < hopper.REACH_MIN_KEYS
    (q, k, v), kw, dout = _training_inputs(17, 2, 8, 64, what)

    def step():
        out = M.attention(q, k, v, backend="triton", **kw)
        return out, torch.autograd.grad(out, [q, k, v], dout)

    def alone():
        with torch.no_grad():
            return M.attention(q, k, v, backend="triton", **kw)

    def norm_passes(fn):
        return sum(n for _, n, name in profile_kernels(fn) if "row_norm_max_kernel" in name)

    assert norm_passes(step) == 0 and norm_passes(alone) == 0
    out, grads = step()
    assert_gradients_close_to_reference(out, grads, [q, k, v], kw, dout, torch.bfloat16)
    with torch.no_grad():
        assert_forward_matches_reference(q, k, v, **kw)


@pytest.mark.parametrize("what, deterministic", [("slopes", None), ("bias-row", None), ("slopes", True)],
                         ids=["slopes", "bias-row", "slopes-reproducible"])
def test_a_training_step_reads_the_reach_norms_once(monkeypatch, what, deterministic):
    """The eager autograd path hands the forward's norm maxima to the backward: one norms pass per forward+backward
    (a bias row's table is still made per pass); the gradients as the float64 reference's."""
    monkeypatch.setattr(hopper, "REACH_MIN_KEYS", 1024)
    (q, k, v), kw, dout = _training_inputs(16, 1, 2, 128, what)

    def step():
        out = M.attention(q, k, v, backend="triton", deterministic=deterministic, **kw)
        return out, torch.autograd.grad(out, [q, k, v], dout)

    launches = {name: count for _, count, name in profile_kernels(step)}
    assert sum(n for name, n in launches.items() if "row_norm_max_kernel" in name) == 1, launches
    assert sum(n for name, n in launches.items() if "row_reach_kernel" in name) == (2 if what == "bias-row" else 0)
    out, grads = step()
    assert_gradients_close_to_reference(out, grads, [q, k, v], kw, dout, torch.bfloat16)


def _forward_table(q, k, v, slopes, bias=None):
    """The table a training step's Hopper forward writes (``hopper.forward_table_applies``), (B, H, cdiv(S_q, 64)):
    each 64 query rows' first key block within reach; from ``slopes`` or a bias row (``bias``, slopes None)."""
    from mpt_attention.impl.triton import hopper_tiles, launch

    got = {}
    launch.forward(q, k, v, bias, slopes, None, None, None, None, q.shape[-1] ** -0.5, True, 0.0, reach_norms=got)
    return hopper_tiles.TABLE_NONE.value - got["table"].view(q.shape[0], q.shape[2], -1)  # (store_first_block's form)


@pytest.mark.parametrize("d, n_kv, s_q, norm_scale, what", [
    (128, 8, 1024, 1.0, "slopes"), (64, 2, 1500, 1.0, "slopes"), (128, 8, 1024, 2.0, "slopes"),
    (96, 4, 1100, 1.0, "slopes"), (128, 8, 1024, 1.0, "row"), (64, 2, 1500, 1.0, "row"), (96, 4, 1100, 1.0, "row"),
    (128, 8, 2000, 1.0, "row-holes")],
    ids=["D128", "D64-GQA", "D128-norms-x2", "D96-tail-GQA", "bias-row-D128", "bias-row-D64-GQA",
         "bias-row-D96-tail-GQA", "bias-row-D128-removed-keys"])
def test_forward_table_leaves_out_only_blocks_below_2_to_the_minus_48(d, n_kv, s_q, norm_scale, what):
    """Each 64 query rows' first key block in the forward's table, from slopes or from MPT's bias row (its terms in
    the extension product, ``hopper_forward.store_row_first_block``; ``row-holes``: keys 700-899 removed): every
    block before it scores below 2^-48 of each row's largest probability, in float64 from the same bfloat16 q and k
    (2^-47.5: the kernel's float32 scores round); no entry lies past its rows' diagonal block; and the steep heads
    do leave blocks out."""
    gen = torch.Generator(device="cuda").manual_seed(21)
    q = (torch.randn(2, s_q, 8, d, device="cuda", generator=gen) * norm_scale).to(torch.bfloat16)
    k, v = ((torch.randn(2, s_q, n_kv, d, device="cuda", generator=gen) * norm_scale).to(torch.bfloat16)
            for _ in range(2))
    slopes = M.gen_slopes(8, return_1d=True, device="cuda")
    c, a = d ** -0.5 * hopper.LOG2E, slopes.double() * hopper.LOG2E
    pos = torch.arange(s_q, device="cuda")
    if what == "slopes":
        assert hopper.forward_table_applies(None, slopes, True, 1, True, s_q, True, False, False)
        table = _forward_table(q, k, v, slopes).long()
        terms = a.view(1, -1, 1, 1) * (pos - (s_q - 1)).view(1, 1, 1, -1)
    else:
        row = _mpt_row(slopes, s_q)
        if what == "row-holes":
            row[..., 700:900] = float("-inf")
        from mpt_attention.impl.triton import launch

        assert hopper.forward_table_applies(launch._log2_bias_rows(row), None, True, 0, True, s_q, True, False, False)
        table = _forward_table(q, k, v, None, row).long()
        terms = row.double() * hopper.LOG2E
    n_w = -(-s_q // 64)
    assert table.shape == (2, 8, n_w)
    kk = k.double().repeat_interleave(8 // n_kv, dim=2)
    # [B, H, S_q, S_k] log2 units: c q.k + the key's term (ALiBi: a (j - (S_k - 1))), causal
    x = c * torch.einsum("bqhd,bkhd->bhqk", q.double(), kk) + terms
    x = x.masked_fill(pos.view(1, 1, 1, -1) > pos.view(1, 1, -1, 1), float("-inf"))
    low = x - x.amax(dim=-1, keepdim=True)  # each score against its row's largest
    rows_w = pos // 64
    left_out = pos.view(1, 1, 1, -1) < (table[..., rows_w] * hopper.BLOCK_N).unsqueeze(-1)  # [B, H, S_q, S_k]
    assert (low[left_out] < -47.5).all(), low[left_out].max()
    assert (table <= (torch.arange(n_w, device="cuda") * 64 // hopper.BLOCK_N)).all()
    assert table[:, 0, -1].min() >= 2  # the steepest head (slope 2^-1) leaves out blocks far behind


def test_forward_table_from_a_row_with_a_soft_masked_key_leaves_nothing_out():
    """MPT's bias row with one key soft-masked (finfo.min): the training forward's table from it leaves no block out
    for any row (``reach.row_block_terms``: next to the soft term a row's float32 scores would not bound its keys)."""
    gen = torch.Generator(device="cuda").manual_seed(22)
    q, k, v = (torch.randn(1, 1024, 8, 128, device="cuda", generator=gen).to(torch.bfloat16) for _ in range(3))
    row = _mpt_row(M.gen_slopes(8, return_1d=True, device="cuda"), 1024)
    row[..., 5] = torch.finfo(torch.float32).min
    assert (_forward_table(q, k, v, None, row) == 0).all()


@pytest.mark.parametrize("case", [
    pytest.param(AttnCase(2, 1024, 1024, 8, 8, 128, causal=True, alibi=True), id="D128"),
    pytest.param(AttnCase(2, 1024, 1024, 8, 2, 128, causal=True, alibi=True), id="D128-GQA-split-heads"),
    pytest.param(AttnCase(1, 1500, 1500, 8, 2, 64, causal=True, alibi=True), id="D64-GQA"),
    pytest.param(AttnCase(1, 700, 1300, 8, 8, 128, causal=True, alibi=True), id="D128-chunked-prefill"),
    pytest.param(AttnCase(1, 1100, 1100, 16, 16, 96, causal=True, alibi=True), id="D96-tail"),
    pytest.param(AttnCase(1, 2560, 2560, 8, 8, 64, causal=True, alibi=True), id="D64-2560"),
    pytest.param(AttnCase(2, 1024, 1024, 8, 2, 128, causal=True, alibi=True), id="bias-row-D128-GQA"),
    pytest.param(AttnCase(1, 1500, 1500, 8, 2, 64, causal=True, alibi=True), id="bias-row-D64-GQA"),
    pytest.param(AttnCase(1, 700, 1300, 8, 8, 128, causal=True, alibi=True), id="bias-row-D128-chunked-prefill"),
    pytest.param(AttnCase(1, 2048, 2048, 8, 8, 96, causal=True, alibi=True), id="bias-row-D96-2048"),
])
def test_a_short_training_step_skips_past_its_forwards_table(monkeypatch, case, request):
    """From REACH_MIN_KEYS / 4 to 3 REACH_MIN_KEYS / 4 keys a training step's backward ends each key block's queries
    where its forward's table says (from slopes, or MPT's bias row in the ``bias-row`` cases): no norm pass runs;
    the forward is bit for bit the one without the table; the gradients match the same step computing every block
    and the float64 reference."""
    (q, k, v), kw = make_inputs(case, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    if "bias-row" in request.node.callspec.id:
        kw["attn_bias"] = _mpt_row(kw.pop("alibi_slopes"), case.s_k)
    assert hopper.REACH_MIN_KEYS // 4 <= case.s_k < 3 * (hopper.REACH_MIN_KEYS // 4)
    dout = torch.randn(q.shape, device="cuda", dtype=torch.bfloat16)

    def step():
        out, lse = M.attention(q, k, v, backend="triton", return_lse=True, **kw)
        return out, lse, torch.autograd.grad(out, [q, k, v], dout)

    launches = {name: n for _, n, name in profile_kernels(step)}
    assert not any("row_norm_max_kernel" in name for name in launches), launches
    out, lse, grads = step()
    monkeypatch.setattr(hopper, "REACH_MIN_KEYS", 1 << 62)  # every block, no table
    every_out, every_lse, every = step()
    assert torch.equal(out, every_out) and torch.equal(lse, every_lse)
    for name, a, b in zip(["dq", "dk", "dv"], grads, every):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2, msg=name)
    assert_gradients_close_to_reference(out, grads, [q, k, v], kw, dout, torch.bfloat16)


@pytest.mark.parametrize("d", [128, 64], ids=["D128", "D64"])
def test_a_short_training_step_never_reads_query_blocks_past_its_forwards_table(d):
    """dO of the last 128 queries is NaN: the steep head's key blocks well behind them (the forward's table leaves
    them out there) keep finite dK and dV, equal to the float64 reference's with those rows zeroed, while the flat
    head, whose reach spans the sequence, reads them all."""
    s, n_heads = 1500, 2
    gen = torch.Generator(device="cuda").manual_seed(6)
    q, k, v = (torch.randn(1, s, n_heads, d, device="cuda", generator=gen).to(torch.bfloat16).requires_grad_()
               for _ in range(3))
    slopes = torch.tensor([0.5, 2.0 ** -8], device="cuda")
    dout = torch.randn(q.shape, device="cuda", generator=gen).to(torch.bfloat16)
    dout_nan = dout.clone()
    dout_nan[:, -128:] = float("nan")
    kw = dict(causal=True, alibi_slopes=slopes)
    out = M.attention(q, k, v, backend="triton", **kw)
    dq, dk, dv = torch.autograd.grad(out, [q, k, v], dout_nan)
    # the table ends the steep head's key blocks' queries ~200 keys on (its ~70-key reach at N(0, 1) norms and one
    # block's ALiBi span): those before key 1024 end short of row 1372
    far = 1024
    for name, g in (("dk", dk), ("dv", dv)):
        assert g[0, :far, 0].isfinite().all(), name
        assert g[0, s - 128:, 0].isnan().all() and g[0, :, 1].isnan().all(), name
    _assert_far_keys_match_reference(q, k, v, dk, dv, dout, kw, far)
