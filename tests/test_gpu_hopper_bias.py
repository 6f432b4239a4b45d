"""Bias tensors on the Hopper kernels (Gluon, sm_90): MPT's (1, H, 1, S_k) row and full or broadcast matrices, in
the forward, the dK/dV kernel and its dQ warpgroup (which stores a matrix's gradient); rows that a bias masks whole,
with -inf, float32's minimum or NaN. Runs on the GPU machine (pytest -m gpu); skipped elsewhere."""

import pytest
import torch

import mpt_attention as M
from mpt_attention.impl.triton import hopper, hopper_dkdv
from mpt_attention.kept import kept_values
from mpt_attention.testing import (
    AttnCase, assert_close_to_reference, assert_forward_matches_reference, assert_gradients_close_to_reference,
    capture_cuda_graph, make_inputs, reference_attention,
)

pytestmark = [pytest.mark.gpu, pytest.mark.hopper]


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
    assert_forward_matches_reference(q, k, v, **kw, attn_bias=bias)
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
        assert_forward_matches_reference(q, k, v, causal=True, attn_bias=bias, softmax_scale=scale)
        if scale is None:
            graph.replay()
            assert_forward_matches_reference(q, k, v, causal=True, attn_bias=bias)
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
    assert_forward_matches_reference(q, k, v, **kw)


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
