"""CUDA-only checks of the Triton backend at real sizes (run on the GPU machine: pytest -m gpu)."""

import pytest
import torch

import mpt_attention as M
from mpt_attention import ops
from mpt_attention.impl.triton import hopper, plans
from mpt_attention.testing import (
    AttnCase, assert_agrees_with_every_block, assert_close_to_reference, assert_gradients_close_to_reference,
    capture_cuda_graph, check_seqused, make_inputs, reference_attention,
)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

CASES = [
    AttnCase(2, 1024, 1024, 8, 2, 128, causal=True, alibi=True),
    AttnCase(2, 2000, 2000, 4, 4, 64, alibi=True, padding=True, bias="vector"),
    AttnCase(2, 512, 1536, 8, 1, 80, causal=True, alibi=True),  # chunked prefill, MQA, D=80
    AttnCase(1, 777, 777, 4, 2, 256, causal=True, bias="full"),
    AttnCase(2, 1100, 1100, 4, 2, 96, causal=True, alibi=True, sequence_id=True, padding="left"),
    AttnCase(2, 640, 640, 4, 4, 112, causal=True, alibi=True, prefix=True),
    AttnCase(4, 1, 4097, 8, 2, 128, causal=True, alibi=True),  # decode
]


def _grads(out, inputs, dout):
    return torch.autograd.grad(out, inputs, dout)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id())
def test_matches_float64_reference(case, dtype):
    (q, k, v), kw = make_inputs(case, dtype=dtype, device="cuda", requires_grad=True)
    bias = kw.get("attn_bias")
    inputs = [q, k, v] + ([bias] if bias is not None else [])
    out = M.attention(q, k, v, backend="triton", **kw)
    dout = torch.randn_like(out)
    assert_gradients_close_to_reference(out, _grads(out, inputs, dout), inputs, kw, dout, dtype)



@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", [
    pytest.param(AttnCase(2, 5, 1, 4, 2, 160), id="D160"),
    pytest.param(AttnCase(1, 1, 1, 2, 1, 256, causal=True), id="D256-causal-one-query"),
    pytest.param(AttnCase(2, 37, 1, 4, 4, 128, bias="vector"), id="D128-bias-vector"),
    pytest.param(AttnCase(2, 7, 1, 4, 2, 72, causal=True, bias="vector"), id="D72-causal-bias-vector"),
    pytest.param(AttnCase(2, 9, 1, 4, 4, 64, bias="full"), id="D64-bias-matrix"),
])
def test_one_key_compiles_and_matches_reference(case, dtype):
    """One key (``s_k == 1``, which Triton turns into a constant): the general kernels' pipelined descriptor loads
    of K, V and a bias row crashed ptxas (CUDA 12.8) there; launch._key_descriptors_ok keeps them to plain loads.
    Forward and the fixed-order backward (whose dQ kernel reads keys through descriptors; a bias taking its
    gradient keeps the backward on the general kernels). Over one key the softmax is constant, so the bias's
    gradient is zero: what the kernels give is float32 cancellation (delta - dP, up to 3.4e-5 on the H200) and is
    checked against a bound rather than by the reference's tolerance rule, whose low-precision error is 0 there."""
    (q, k, v), kw = make_inputs(case, dtype=dtype, device="cuda", requires_grad=True)
    bias = kw.get("attn_bias")
    out = M.attention(q, k, v, backend="triton", deterministic=True, **kw)
    dout = torch.randn_like(out)
    grads = _grads(out, [q, k, v] + ([bias] if bias is not None else []), dout)
    assert_gradients_close_to_reference(out, grads[:3], [q, k, v], kw, dout, dtype)
    if bias is not None:
        assert grads[3].abs().max() <= 1e-4, grads[3].abs().max()


@pytest.mark.parametrize("deterministic", [True, None], ids=["reproducible", "default"])
@pytest.mark.parametrize("case", [
    pytest.param(AttnCase(2, 300, 333, 4, 2, 128, causal=True, alibi=True, bias="full"), id="D128-causal-full"),
    pytest.param(AttnCase(2, 257, 257, 4, 4, 96, padding=True, bias="matrix"), id="D96-padding-batch-matrix"),
])
def test_float32_bias_matrix_gradient_from_the_dq_kernel(case, deterministic):
    """A float32 bias matrix with its gradient and bf16 inputs: dS goes to the gradient in float32, so the dQ kernel
    stores it (no dQ GEMM on a stored dS in q's dtype); its config at D 72-128
    (``launch_backward._bwd_config(wide_ds=True)``) fits Hopper's shared memory, where the default one did not
    launch."""
    (q, k, v), kw = make_inputs(case, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    inputs = [q, k, v, kw["attn_bias"]]
    assert kw["attn_bias"].dtype == torch.float32
    out = M.attention(q, k, v, backend="triton", deterministic=deterministic, **kw)
    dout = torch.randn_like(out)
    assert_gradients_close_to_reference(out, _grads(out, inputs, dout), inputs, kw, dout, torch.bfloat16)


@pytest.mark.parametrize("case", [
    AttnCase(2, 1000, 1000, 8, 2, 128, causal=True, alibi=True, padding="left", bias="full"),
    AttnCase(1, 700, 900, 4, 4, 64, bias="full")], ids=lambda c: c.id())
def test_full_bias_in_the_inputs_dtype_takes_dq_from_stored_ds(dq_gemm_calls, case):
    """The bias MPT builds is in the model's dtype: reproducibly (elsewhere also by default: key padding, no
    Hopper GPU) the dK/dV kernel stores dS and dQ is one GEMM on it."""
    dtype = torch.bfloat16
    (q, k, v), kw = make_inputs(case, dtype=dtype, device="cuda", requires_grad=True)
    kw["attn_bias"] = bias = kw["attn_bias"].detach().to(dtype).requires_grad_()
    out = M.attention(q, k, v, backend="triton", deterministic=True, **kw)
    dout = torch.randn_like(out)
    grads = _grads(out, [q, k, v, bias], dout)
    assert dq_gemm_calls == [1]
    assert_gradients_close_to_reference(out, grads, [q, k, v, bias], kw, dout, dtype)


def test_float32_uses_ieee_dots():
    (q, k, v), kw = make_inputs(AttnCase(2, 300, 300, 4, 2, 64, causal=True, alibi=True), device="cuda")
    out = M.attention(q, k, v, backend="triton", **kw)
    ref, _ = reference_attention(q, k, v, **kw)
    assert (out.double() - ref).abs().max().item() < 1e-5


@pytest.mark.parametrize("deterministic", [True, False], ids=["reproducible", "atomic-dq"])
@pytest.mark.parametrize("case", [
    pytest.param(AttnCase(2, 300, 333, 4, 2, 128, causal=True, alibi=True, padding=True), id="D128-alibi-padding"),
    pytest.param(AttnCase(2, 257, 257, 4, 4, 80, bias="full"), id="D80-bias-full"),
    pytest.param(AttnCase(1, 200, 200, 2, 2, 112, causal=True, bias="vector"), id="D112-bias-vector"),
])
def test_float32_past_64_columns_forward_and_backward(case, deterministic):
    """Float32 inputs at D 72-128: the general kernels with D>128's block configs (``launch._config_head_dim``;
    the bf16 ones needed up to 328 KB of shared memory in float32 and did not launch), every gradient."""
    (q, k, v), kw = make_inputs(case, device="cuda", requires_grad=True)
    bias = kw.get("attn_bias")
    inputs = [q, k, v] + ([bias] if bias is not None else [])
    out = M.attention(q, k, v, backend="triton", deterministic=deterministic, **kw)
    dout = torch.randn_like(out)
    assert_gradients_close_to_reference(out, _grads(out, inputs, dout), inputs, kw, dout, torch.float32)


@pytest.mark.parametrize("s_q", [2048, 700], ids=["s2048", "chunked-prefill-700-of-2048"])
def test_float32_causal_alibi_meets_the_tolerance_rule_at_length(s_q):
    """Float32 causal ALiBi at MPT's slopes and S 2048, also as a chunked prefill: out, the returned log-sum-exp and
    the gradients of ``out * dout + lse * dlse`` meet the 2x rule. The kernels measure ALiBi from each row's
    diagonal; in MPT's own form, dK and dV at this shape were 2.1x and 2.8x torch's float32 error
    (benchmarks/alibi_precision.py, session 45)."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, n, 4, 64, device="cuda", generator=gen) for n in (s_q, 2048, 2048))
    kw = dict(causal=True, alibi_slopes=torch.tensor([2 ** -0.5, 2 ** -1, 2 ** -4, 2 ** -8], device="cuda"))
    inputs = [x.requires_grad_() for x in (q, k, v)]
    out, lse = M.attention(*inputs, backend="triton", return_lse=True, **kw)
    dout, dlse = torch.randn_like(out), torch.randn_like(lse)
    grads = torch.autograd.grad([out, lse], inputs, [dout, dlse])
    _, ref_lse = reference_attention(*(x.detach().double() for x in inputs), **kw)
    _, low_lse = reference_attention(*(x.detach() for x in inputs), compute_dtype=torch.float32, **kw)
    assert_close_to_reference("lse", lse, ref_lse, low_lse)
    assert_gradients_close_to_reference(out, grads, inputs, kw, dout, torch.float32, dlse=dlse)


@pytest.mark.parametrize("case", [AttnCase(2, 1500, 1500, 8, 2, 128, causal=True, alibi=True, padding=True),
                                  AttnCase(2, 1000, 1000, 8, 2, 128, causal=True, bias="full")],
                         ids=["alibi-padding", "full-bias-dq-gemm"])
def test_forward_and_backward_are_bitwise_deterministic(case):
    (q, k, v), kw = make_inputs(case, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    wrt = [q, k, v]
    if "attn_bias" in kw:  # in q's dtype: dS stored by the dK/dV kernel, dQ by one GEMM on it
        kw["attn_bias"] = kw["attn_bias"].detach().to(torch.bfloat16).requires_grad_()
        wrt.append(kw["attn_bias"])
    runs = []
    for _ in range(2):
        out = M.attention(q, k, v, backend="triton", deterministic=True, **kw)
        runs.append((out, *_grads(out, wrt, torch.ones_like(out))))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_default_backward_is_reproducible_under_torch_deterministic_algorithms():
    """deterministic=None (the default) follows torch.use_deterministic_algorithms: on, the Hopper inputs
    that otherwise take the dQ warpgroup (float32 reductions in any order) get the fixed-order passes."""
    (q, k, v), kw = make_inputs(AttnCase(2, 1100, 1100, 8, 8, 128, causal=True, alibi=True), dtype=torch.bfloat16,
                                device="cuda", requires_grad=True)
    was = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        runs = []
        for _ in range(2):
            out = M.attention(q, k, v, backend="triton", **kw)
            runs.append(_grads(out, [q, k, v], torch.ones_like(out)))
        explicit = _grads(M.attention(q, k, v, backend="triton", deterministic=True, **kw), [q, k, v],
                          torch.ones_like(out))
    finally:
        torch.use_deterministic_algorithms(was[0], warn_only=was[1])
    for a, b, c in zip(*runs, explicit):
        assert torch.equal(a, b) and torch.equal(a, c)


@pytest.mark.parametrize("s_q", [16, 128], ids=["16-queries", "128-queries"])
def test_offsets_beyond_2_to_the_31_elements(s_q):
    """K/V of 2^31 + elements: every index into them must be 64-bit (128 queries take the Hopper
    kernel on sm_90, whose copy engine addresses them with 64-bit bases and strides)."""
    s_k, n_kv, d = (1 << 20) + 37, 16, 128
    assert s_k * n_kv * d > 2**31
    gen = torch.Generator(device="cuda").manual_seed(0)
    k = torch.randn(1, s_k, n_kv, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn(1, s_k, n_kv, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    q = torch.randn(1, s_q, n_kv, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    slopes = M.gen_slopes(n_kv, return_1d=True, device="cuda")
    out = M.attention(q, k, v, backend="triton", causal=True, alibi_slopes=slopes)
    # reference on the last 16k keys only: with these slopes everything further back has weight < 1e-30
    tail = 1 << 14
    ref, _ = reference_attention(q.float(), k[:, -tail:].float(), v[:, -tail:].float(), causal=True,
                                 alibi_slopes=slopes, compute_dtype=torch.float32)
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)
    del k, v


@pytest.mark.parametrize("deterministic", [True, None], ids=["reproducible", "default"])
@pytest.mark.parametrize("hopper_kernels", [True, False], ids=["hopper-where-it-applies", "general-kernels"])
def test_more_batch_rows_times_heads_than_a_grid_axis_takes(monkeypatch, hopper_kernels, deterministic):
    """B * H_q = 67584 (batch, head) rows, past the 65535 CUDA takes on a grid's second axis: the kernels'
    grids are (blocks, heads, batch) (the Hopper dK/dV kernel's one flat axis), including the bias-row
    conversion's and the backward's delta pass."""
    monkeypatch.setattr(hopper, "ENABLED", hopper_kernels)
    case = AttnCase(2112, 5, 5, 32, 4, 128, causal=True, alibi=True)
    (q, k, v), kw = make_inputs(case, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    kw["attn_bias"] = torch.randn(case.batch, case.n_heads, 1, case.s_k, device="cuda")
    out = M.attention(q, k, v, backend="triton", deterministic=deterministic, **kw)
    dout = torch.randn_like(out)
    assert_gradients_close_to_reference(out, _grads(out, [q, k, v], dout), [q, k, v], kw, dout, torch.bfloat16)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("case", [CASES[0], AttnCase(2, 300, 300, 4, 4, 64, causal=True, bias="vector", padding=True)],
                         ids=["hopper-where-it-applies", "general-kernels"])
def test_tensors_on_a_gpu_other_than_the_current_one(case):
    """A model split over GPUs (device_map="auto") calls a layer on cuda:1 while the current device is cuda:0:
    every launch (forward, backward, the bias-row conversion) must run on the tensors' GPU."""
    assert torch.cuda.current_device() == 0
    (q, k, v), kw = make_inputs(case, dtype=torch.bfloat16, device="cuda:1", requires_grad=True)
    out = M.attention(q, k, v, backend="triton", **kw)
    dout = torch.randn_like(out)
    assert_gradients_close_to_reference(out, _grads(out, [q, k, v], dout), [q, k, v], kw, dout, torch.bfloat16)
    assert torch.cuda.current_device() == 0


@pytest.mark.parametrize("s_q", [1, 256], ids=["decode-general-kernel", "prefill-hopper-on-sm90"])
def test_forward_replays_in_a_cuda_graph(s_q):
    """Serving captures decode steps in CUDA graphs to hide host time: the forward must be capturable
    (no host syncs, no host-to-device copies) and a replay must follow new values in the same buffers."""
    case = AttnCase(2, s_q, 1024, 8, 2, 128, causal=True, alibi=True)
    (q, k, v), kw = make_inputs(case, dtype=torch.bfloat16, device="cuda")

    def run():
        return M.attention(q, k, v, backend="triton", **kw)

    graph, out = capture_cuda_graph(run)
    for _ in range(2):
        for t in (q, k, v):
            t.copy_(torch.randn_like(t))
        graph.replay()
        torch.cuda.synchronize()
        ref, _ = reference_attention(q.double(), k.double(), v.double(), **kw)
        low, _ = reference_attention(q, k, v, compute_dtype=torch.bfloat16, **kw)
        assert_close_to_reference("out", out, ref, low)


def test_dropout_mask_is_exact_on_gpu():
    (q, k, v), kw = make_inputs(AttnCase(2, 300, 300, 4, 2, 64, causal=True, alibi=True), device="cuda")
    torch.manual_seed(5)
    seed = torch.randint(0, 2**62, (1,), dtype=torch.int64, device="cuda")  # as ops.triton_attention draws it
    torch.manual_seed(5)
    out = M.attention(q, k, v, backend="triton", dropout_p=0.2, **kw)
    keep = ops.triton_dropout_mask(2, 4, 300, 300, seed, 0.2)
    ref, _ = reference_attention(q, k, v, dropout_mask=keep, dropout_p=0.2, **kw)
    assert (out.double() - ref).abs().max().item() < 1e-4


def test_compile_fullgraph_inductor():
    (q, k, v), kw = make_inputs(AttnCase(2, 512, 512, 8, 2, 64, causal=True, alibi=True), dtype=torch.bfloat16,
                                device="cuda", requires_grad=True)
    fn = torch.compile(lambda q, k, v: M.attention(q, k, v, backend="triton", **kw).square().sum(), fullgraph=True)
    fn(q, k, v).backward()
    got = q.grad.clone()
    q.grad = None
    M.attention(q, k, v, backend="triton", **kw).square().sum().backward()
    # on Hopper the default backward sums dQ in no fixed order (the dQ warpgroup): equal up to that
    torch.testing.assert_close(got, q.grad, rtol=1e-2, atol=1e-3)


def _peak_extra_bytes(s: int, bias_vector: bool) -> int:
    b, h, d = 1, 8, 128
    (q, k, v), kw = make_inputs(AttnCase(b, s, s, h, h, d, causal=True, alibi=not bias_vector,
                                         bias="vector" if bias_vector else None),
                                dtype=torch.bfloat16, device="cuda", requires_grad=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = M.attention(q, k, v, backend="triton", **kw)
    out.backward(torch.ones_like(out))
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


@pytest.mark.parametrize("bias_vector", [False, True], ids=["alibi", "vector-bias-with-grad"])
def test_peak_memory_is_linear_in_sequence_length(bias_vector):
    small, large = _peak_extra_bytes(8192, bias_vector), _peak_extra_bytes(16384, bias_vector)
    assert large < 2.3 * small, f"peak extra memory grew {large / small:.2f}x when S doubled"
    assert large < 64 * 16384 * 8 * 128 * 2, "more than a few multiples of the q/k/v/o sizes"


def test_nan_in_padded_keys_does_not_leak():
    (q, k, v), kw = make_inputs(AttnCase(2, 700, 700, 8, 2, 128, causal=True, alibi=True, padding=True),
                                dtype=torch.bfloat16, device="cuda")
    pad = ~kw["key_padding_mask"]
    runs = []
    for fill in (None, float("nan")):
        kk, vv = k.clone(), v.clone()
        if fill is not None:
            kk[pad], vv[pad] = fill, fill
        qq, kk, vv = (x.requires_grad_() for x in (q.clone(), kk, vv))
        out = M.attention(qq, kk, vv, backend="triton", **kw)
        out.backward(torch.ones_like(out))
        runs.append((out, qq.grad, kk.grad[~pad], vv.grad[~pad]))
    for clean, dirty in zip(*runs):
        assert torch.equal(clean, dirty)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("head_dim,n_kv,causal,deterministic", [(128, 2, True, None), (64, 8, False, False)],
                         ids=["D128-GQA-causal", "D64-MHA-atomic-dq"])
def test_seqused_matches_float64_reference_on_the_general_kernels(monkeypatch, dtype, head_dim, n_kv, causal,
                                                                  deterministic):
    """A right-padded batch read in place (``seqused``; a row with no real token, lengths across block boundaries),
    the padded rows NaN, on the general kernels (the Hopper ones switched off)."""
    monkeypatch.setattr(hopper, "ENABLED", False)
    rows, used = [1500] * 4, [1500, 1, 0, 777]
    slopes = M.gen_slopes(8, return_1d=True, device="cuda")
    check_seqused("triton", rows, used, rows, used, 8, n_kv, head_dim, causal, slopes, dtype, "cuda",
                  deterministic=deterministic)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("head_dim,n_kv,causal,alibi,used_q", [
    (128, 2, True, True, None), (64, 8, False, True, None), (96, 1, True, False, None),
    (128, 8, True, True, [300, 1, 0, 700]), (64, 2, True, False, [1501, 129, 0, 5])],
    ids=["D128-GQA-causal-alibi", "D64-MHA-symmetric-alibi", "D96-MQA-causal", "D128-chunk-at-cache-end",
         "D64-GQA-causal-chunk"])
def test_seqused_matches_float64_reference_on_the_hopper_kernels(monkeypatch, dtype, head_dim, n_kv, causal, alibi,
                                                                 used_q):
    """``seqused`` on the Hopper forward and fused backward: sequences of odd capacities (query blocks that start
    inside the previous sequence's unused rows), used lengths across 128-row blocks, one row, none, a full one; every
    unused row of q, k, v and dO NaN, which the kernels clear where a block reaches them (``clear_rows``)."""
    calls = []
    for module, name in ((hopper, "run_forward"), (plans, "run_fused")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name,
                            lambda *a, _real=real, _name=name, **kw: calls.append(_name) or _real(*a, **kw))
    caps, used_k = [1501, 1500, 1499, 803], [1501, 131, 0, 777]
    slopes = M.gen_slopes(8, return_1d=True, device="cuda") if alibi else None
    check_seqused("triton", caps, used_q or used_k, caps, used_k, 8, n_kv, head_dim, causal, slopes, dtype, "cuda")
    assert calls == ["run_forward", "run_fused"], calls


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("head_dim,n_kv,causal", [(128, 2, True), (64, 8, False), (96, 1, True)],
                         ids=["D128-GQA-causal", "D64-MHA", "D96-MQA-causal"])
def test_varlen_matches_float64_reference(dtype, head_dim, n_kv, causal):
    """Packed sequences of uneven lengths (one empty, one past every block boundary), chunked-prefill
    shaped (more keys than queries), each held to the reference run on it alone."""
    lens_q, lens_k, n_heads = [700, 1, 0, 1337, 64], [900, 1, 40, 1337, 63], 8
    cu_q, cu_k = (torch.tensor([0] + l, device="cuda").cumsum(0, dtype=torch.int32) for l in (lens_q, lens_k))
    gen = torch.Generator(device="cuda").manual_seed(3)
    randn = lambda *s: torch.randn(*s, device="cuda", generator=gen).to(dtype).requires_grad_()
    q = randn(sum(lens_q), n_heads, head_dim)
    k, v = randn(sum(lens_k), n_kv, head_dim), randn(sum(lens_k), n_kv, head_dim)
    slopes = M.gen_slopes(n_heads, return_1d=True, device="cuda")
    out = M.attention_varlen(q, k, v, cu_q, cu_k, backend="triton", causal=causal, alibi_slopes=slopes)
    dout = torch.randn_like(out)
    grads = _grads(out, [q, k, v], dout)
    for b in range(len(lens_q)):
        qs, ks = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        if lens_q[b] == 0:  # keys nobody queries get zero gradients
            assert (grads[1][ks] == 0).all() and (grads[2][ks] == 0).all()
            continue
        ins = [x[s].detach()[None] for x, s in ((q, qs), (k, ks), (v, ks))]
        ref_in = [x.double().requires_grad_() for x in ins]
        low_in = [x.clone().requires_grad_() for x in ins]
        ref, _ = reference_attention(*ref_in, causal=causal, alibi_slopes=slopes)
        low, _ = reference_attention(*low_in, causal=causal, alibi_slopes=slopes, compute_dtype=dtype)
        d = dout[qs][None]
        assert_close_to_reference(f"out[{b}]", out[qs][None], ref, low)
        ref_g, low_g = _grads(ref, ref_in, d.double()), _grads(low, low_in, d.to(low.dtype))
        for name, g, s, r, lo in zip(["dq", "dk", "dv"], grads, (qs, ks, ks), ref_g, low_g):
            assert_close_to_reference(f"{name}[{b}]", g[s][None], r, lo)



@pytest.mark.parametrize("case", CASES[:5], ids=lambda c: c.id())
def test_atomic_dq_matches_float64_reference(case, monkeypatch):
    """deterministic=False: dQ summed with float32 atomics inside the general dK/dV kernel (the Hopper
    kernels off: where they apply, deterministic=False takes them, see the next test)."""
    monkeypatch.setattr(hopper, "ENABLED", False)
    (q, k, v), kw = make_inputs(case, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    bias = kw.get("attn_bias")
    inputs = [q, k, v] + ([bias] if bias is not None else [])
    out = M.attention(q, k, v, backend="triton", deterministic=False, **kw)
    dout = torch.randn_like(out)
    assert_gradients_close_to_reference(out, _grads(out, inputs, dout), inputs, kw, dout, torch.bfloat16)


def test_atomic_dq_varies_only_in_rounding_and_dk_dv_stay_bitwise(monkeypatch):
    monkeypatch.setattr(hopper, "ENABLED", False)
    (q, k, v), kw = make_inputs(AttnCase(2, 1500, 1500, 8, 2, 128, causal=True, alibi=True),
                                dtype=torch.bfloat16, device="cuda", requires_grad=True)
    runs = []
    for _ in range(3):
        out = M.attention(q, k, v, backend="triton", deterministic=False, **kw)
        runs.append(_grads(out, [q, k, v], torch.ones_like(out)))
    for dq, dk, dv in runs[1:]:
        assert torch.equal(dk, runs[0][1]) and torch.equal(dv, runs[0][2])
        rel = ((dq.float() - runs[0][0].float()).norm() / runs[0][0].float().norm()).item()
        assert rel < 1e-2, f"dQ moved by {rel:.1e} between runs: more than summation-order rounding"


@pytest.mark.parametrize("head_dim, n_kv, deterministic",
                         [(128, 2, True), (64, 2, True), (128, 8, None), (64, 2, None)],
                         ids=["hopper-dkdv-and-dq-kernel-on-sm90", "general-kernels", "hopper-dq-warpgroup-on-sm90",
                              "hopper-dq-warpgroup-grouped-heads-on-sm90"])
def test_backward_replays_in_a_cuda_graph(head_dim, n_kv, deterministic):
    """Training loops capture forward and backward in one CUDA graph. Reproducible, with grouped heads (and
    with the Hopper dK/dV kernel) the backward's dQ kernel runs on a second stream beside the dK/dV kernel,
    which capture must follow (fork and join) and replay. By default on Hopper the dK/dV kernel's dQ
    warpgroup adds dQ into a zeroed float32 buffer (dQ then equal up to summation order), and with grouped
    heads the programs' dK, dV partials are summed after it."""
    case = AttnCase(2, 700, 700, 8, n_kv, head_dim, causal=True, alibi=True)
    (q, k, v), kw = make_inputs(case, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    dout = torch.randn(q.shape, device="cuda", dtype=torch.bfloat16)

    def step():
        return _grads(M.attention(q, k, v, backend="triton", deterministic=deterministic, **kw), [q, k, v], dout)

    graph, grads = capture_cuda_graph(step)
    for _ in range(2):
        with torch.no_grad():
            for t in (q, k, v, dout):
                t.copy_(torch.randn_like(t))
        graph.replay()
        torch.cuda.synchronize()
        eager = step()
        for name, g, e in zip(["dq", "dk", "dv"], grads, eager):
            if name == "dq" and deterministic is None:
                torch.testing.assert_close(g, e, rtol=1e-2, atol=1e-2)
            else:
                assert torch.equal(g, e), name


@pytest.mark.parametrize("head_dim, n_kv", [(128, 8), (64, 2)],
                         ids=["hopper-consumers-form-dq-on-sm90", "hopper-dq-warpgroup-grouped-heads-on-sm90"])
def test_make_graphed_callables_replays_forward_and_backward_graphs(head_dim, n_kv):
    """``torch.cuda.make_graphed_callables`` captures the forward and the backward in two graphs, the backward's
    reading what the forward graph saved: replayed, they give the eager gradients (dQ up to its sums' order)."""
    case = AttnCase(2, 700, 700, 8, n_kv, head_dim, causal=True, alibi=True)
    (q, k, v), kw = make_inputs(case, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    dout = torch.randn(q.shape, device="cuda", dtype=torch.bfloat16)

    def attend(q, k, v):
        return M.attention(q, k, v, backend="triton", **kw)

    graphed = torch.cuda.make_graphed_callables(attend, (q, k, v))
    for _ in range(2):
        with torch.no_grad():
            for t in (q, k, v, dout):
                t.copy_(torch.randn_like(t))
        out = graphed(q, k, v)
        grads = _grads(out, [q, k, v], dout)
        torch.cuda.synchronize()
        eager_out = attend(q, k, v)
        eager = _grads(eager_out, [q, k, v], dout)
        assert torch.equal(out, eager_out)
        torch.testing.assert_close(grads[0], eager[0], rtol=1e-2, atol=1e-2)
        for name, g, e in zip(["dk", "dv"], grads[1:], eager[1:]):
            assert torch.equal(g, e), name


@pytest.mark.parametrize("deterministic, bias", [
    pytest.param(None, None, id="dq-warpgroup-or-default"),
    pytest.param(True, None, id="reproducible"),
    pytest.param(None, "vector", id="bias-row"),
])
def test_the_lean_launcher_runs_repeated_steps_from_its_cache(monkeypatch, deterministic, bias):
    """A training step's kernels launch through Triton's own path the first time, from the lean launcher's
    cache after (impl/triton/lean_launch.py), found by their arguments without Triton's binder, with the same
    results; with a profiler's launch hook installed every launch is Triton's again, and the hook sees each."""
    from triton import knobs
    from triton.runtime import jit

    from mpt_attention.impl.triton import lean_launch

    triton_runs, real_run = [], jit.JITFunction.run
    monkeypatch.setattr(jit.JITFunction, "run",
                        lambda self, *a, **kw: (triton_runs.append(1), real_run(self, *a, **kw))[1])
    binds, real_bind = [], lean_launch.bind
    monkeypatch.setattr(lean_launch, "bind", lambda *a, **kw: (binds.append(1), real_bind(*a, **kw))[1])
    monkeypatch.setattr(lean_launch, "_KERNELS", {})
    monkeypatch.setattr(lean_launch, "_BY_ARGUMENTS", {})
    (q, k, v), kw = make_inputs(AttnCase(2, 1000, 1000, 8, 2, 128, causal=True, alibi=bias is None, bias=bias),
                                device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dout = torch.randn_like(q)

    def step():
        # a bias tensor new to each step (a copy), so that its conversion launches again (kept.kept_on keeps it on
        # the tensor for later calls) and every step launches the same kernels
        given = kw if bias is None else dict(kw, attn_bias=kw["attn_bias"].clone())
        out = M.attention(q, k, v, backend="triton", deterministic=deterministic, **given)
        return (out, *_grads(out, [q, k, v], dout))

    first = step()
    assert triton_runs and len(lean_launch._KERNELS) == len(triton_runs)
    triton_runs.clear()
    binds.clear()
    second = step()
    assert not triton_runs and not binds  # every launch found by its arguments (lean_launch.argument_key)
    for a, b in zip(first, second):  # dQ from the warpgroup's float32 reductions: any order, so closely
        torch.testing.assert_close(a, b, atol=0 if deterministic else 1e-2, rtol=0 if deterministic else 1e-2)
    seen = []
    knobs.runtime.launch_enter_hook.add(seen.append)
    try:
        step()
    finally:
        knobs.runtime.launch_enter_hook.remove(seen.append)
    assert len(seen) == len(triton_runs) == len(lean_launch._KERNELS)


@pytest.mark.parametrize("case, deterministic", [
    pytest.param(AttnCase(2, 4096, 4096, 8, 2, 64, causal=True, alibi=True), True, id="D64-GQA"),
    pytest.param(AttnCase(1, 2500, 4500, 4, 4, 128, causal=True, alibi=True), False, id="D128-chunked-atomic-dq"),
])
def test_general_kernels_past_the_reach_match_every_block(monkeypatch, case, deterministic):
    """The general kernels (the Hopper kernels off, as on other GPUs) skip key blocks past causal ALiBi's reach
    (forward and dQ from the tile's first query, dK/dV's queries after the block's last key; launch._general_reach):
    against the same kernels computing every block, and against the float64 reference."""
    monkeypatch.setattr(hopper, "ENABLED", False)
    (q, k, v), kw = make_inputs(case, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    dout = torch.randn(q.shape, device="cuda", dtype=torch.bfloat16)
    out, grads = _reach_matches_every_block(
        monkeypatch, lambda: M.attention(q, k, v, backend="triton", deterministic=deterministic, **kw), [q, k, v], dout)
    assert_gradients_close_to_reference(out, grads, [q, k, v], kw, dout, torch.bfloat16)


def _reach_matches_every_block(monkeypatch, call, leaves, dout):
    """``call()``'s output and its gradients with the reach from 1024 keys (``hopper.REACH_MIN_KEYS``), checked
    against computing every block: the output as ``assert_agrees_with_every_block`` allows, the gradients within
    2e-2."""
    def run(min_keys):
        monkeypatch.setattr(hopper, "REACH_MIN_KEYS", min_keys)
        out = call()
        return out, _grads(out, leaves, dout)

    every_out, every = run(1 << 62)
    out, grads = run(1024)
    assert_agrees_with_every_block(out, every_out, leaves[2])
    for name, a, b in zip(["dq", "dk", "dv"], grads, every):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2, msg=name)
    return out, grads


@pytest.mark.parametrize("deterministic", [True, False], ids=["two-pass", "atomic-dq"])
def test_general_kernels_past_the_reach_in_packed_sequences(monkeypatch, deterministic):
    """``attention_varlen`` on the general kernels (the Hopper kernels off) skips key blocks past causal ALiBi's reach
    in each sequence (one norm bound per head over all tokens, reach.norm_row): against computing every block, and
    each sequence against the float64 reference. Sequences of 4096, 3000 queries on 5000 keys, and 700."""
    from mpt_attention.testing import make_varlen_inputs, reference_attention_varlen

    monkeypatch.setattr(hopper, "ENABLED", False)
    q, k, v, cu_q, cu_k = make_varlen_inputs([4096, 3000, 700], [4096, 5000, 700], 8, 2, 64, torch.bfloat16, "cuda",
                                             seed=5, requires_grad=True)
    gen = torch.Generator(device="cuda").manual_seed(5)
    slopes = M.gen_slopes(8, return_1d=True, device="cuda")
    dout = torch.randn(q.shape, device="cuda", generator=gen).bfloat16()
    kw = dict(backend="triton", causal=True, alibi_slopes=slopes, deterministic=deterministic)
    out, grads = _reach_matches_every_block(
        monkeypatch, lambda: M.attention_varlen(q, k, v, cu_q, cu_k, **kw), [q, k, v], dout)
    refs = []
    for dtype in (torch.float64, torch.bfloat16):
        xs = [x.detach().to(dtype).requires_grad_() for x in (q, k, v)]
        ref, _ = reference_attention_varlen(*xs, cu_q, cu_k, causal=True, alibi_slopes=slopes, compute_dtype=dtype)
        refs.append([ref.detach(), *_grads(ref, xs, dout.to(dtype))])
    for name, got, ref, low in zip(["out", "dq", "dk", "dv"], [out.detach(), *grads], *refs):
        assert_close_to_reference(name, got, ref, low)
