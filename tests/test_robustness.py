"""Numerical edge cases and odd shapes on every backend: finite, documented, equal to the reference."""

import pytest
import torch

import mpt_attention as M
from mpt_attention.testing import AttnCase, make_inputs, reference_attention

BACKENDS = ["torch", "sdpa", "triton"]


def _ref(q, k, v, **kw):
    return reference_attention(q.double(), k.double(), v.double(),
                               **{n: (t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t)
                                  for n, t in kw.items()})[0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp16_scores_beyond_fp16_range(backend):
    """q.k reaches ~2e5 > 65504: the product must be accumulated in float32, never overflow."""
    (q, k, v), kw = make_inputs(AttnCase(2, 37, 37, 2, 2, 64, causal=True, alibi=True), dtype=torch.float16)
    q, k = q * 60, k * 60
    scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float())
    assert scores.abs().max() > 65504
    out = M.attention(q, k, v, backend=backend, softmax_scale=1.0, **kw)
    assert torch.isfinite(out).all()
    ref = _ref(q, k, v, softmax_scale=1.0, **kw)
    assert (out.double() - ref).abs().max().item() < 2e-2


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", [1e4, 1e-8, 0.0], ids=["huge", "tiny", "zero"])
def test_extreme_softmax_scales(backend, scale):
    (q, k, v), kw = make_inputs(AttnCase(2, 33, 33, 2, 1, 16, causal=True, padding=True))
    out = M.attention(q, k, v, backend=backend, softmax_scale=scale, **kw)
    ref = _ref(q, k, v, softmax_scale=scale, **kw)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_alibi_over_64k_positions(backend):
    """One decode query over a 64k cache: ALiBi distances reach 65535 (slope * distance ~ -3e4)."""
    s_k = 1 << 16
    gen = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(1, 1, 2, 16, generator=gen), torch.randn(1, s_k, 1, 16, generator=gen), torch.randn(1, s_k, 1, 16, generator=gen)
    slopes = M.gen_slopes(2, return_1d=True)
    if backend == "sdpa":
        out, lse = M.attention(q, k, v, backend=backend, causal=True, alibi_slopes=slopes), None
    else:
        out, lse = M.attention(q, k, v, backend=backend, causal=True, alibi_slopes=slopes, return_lse=True)
    ref, ref_lse = reference_attention(q.double(), k.double(), v.double(), causal=True, alibi_slopes=slopes)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    if lse is not None:
        torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bias_at_float32_extremes(backend):
    """MPT masks with finfo(float32).min in the bias: a row masked only that way stays a (uniform)
    softmax on every backend, like natural-unit math; -inf removes keys; huge positive values win."""
    (q, k, v), kw = make_inputs(AttnCase(1, 6, 6, 1, 1, 16))
    lo, hi = torch.finfo(torch.float32).min, 1e30
    bias = torch.zeros(1, 1, 6, 6)
    bias[..., 0, :] = lo  # the whole row at min
    bias[..., 1, 3:] = lo  # part of a row at min
    bias[..., 2, :] = float("-inf")  # the whole row removed: output 0
    bias[..., 3, 2] = hi  # one dominating key
    out = M.attention(q, k, v, backend=backend, attn_bias=bias)
    torch.testing.assert_close(out[0, 0, 0], v[0, :, 0].mean(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[0, 1, 0], _ref(q, k, v, attn_bias=bias)[0, 1, 0].float(), rtol=1e-5, atol=1e-5)
    assert (out[0, 2] == 0).all()
    torch.testing.assert_close(out[0, 3, 0], v[0, 2, 0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("clip", [1e-6, 1e4], ids=["tiny-clip", "huge-clip"])
def test_clip_qkv_limits(backend, clip):
    torch.manual_seed(1)
    layer = M.GroupedQueryAttention(64, 4, 2, attn_impl=backend, clip_qkv=clip)
    reference = M.GroupedQueryAttention(64, 4, 2, attn_impl="torch", clip_qkv=clip)
    reference.load_state_dict(layer.state_dict())
    x = torch.randn(2, 19, 64) * 50
    out, _, _ = layer(x)
    expected, _, _ = reference(x)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("s_q,s_k", [(0, 5), (5, 0), (0, 0)], ids=["no-queries", "no-keys", "empty"])
def test_zero_length_sequences(backend, s_q, s_k):
    q = torch.randn(2, s_q, 2, 16, requires_grad=True)
    k = torch.randn(2, s_k, 1, 16, requires_grad=True)
    v = torch.randn(2, s_k, 1, 16, requires_grad=True)
    out = M.attention(q, k, v, backend=backend, causal=True)
    assert out.shape == (2, s_q, 2, 16) and (out == 0).all()
    out.sum().backward()
    for t in (q, k, v):
        assert t.grad is not None and (t.grad == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_stride_zero_broadcast_bias_and_transposed_views(backend):
    (q, k, v), kw = make_inputs(AttnCase(3, 21, 21, 4, 2, 16, causal=True))
    row = torch.randn(1, 4, 1, 21)
    expanded = row.expand(3, 4, 21, 21)  # stride 0 over batch and query rows, no copy
    assert expanded.stride()[0] == 0 and expanded.stride()[2] == 0
    out = M.attention(q, k, v, backend=backend, attn_bias=expanded, **kw)
    torch.testing.assert_close(out, M.attention(q, k, v, backend=backend, attn_bias=row, **kw))
    k_view = k.transpose(0, 1).contiguous().transpose(0, 1)  # a (S, B, H, D) buffer seen as (B, S, H, D)
    torch.testing.assert_close(M.attention(q, k_view, v, backend=backend, **kw), M.attention(q, k, v, backend=backend, **kw))


@pytest.mark.parametrize("head_dim", [1, 8, 200, 256])
def test_triton_head_dim_extremes(head_dim):
    (q, k, v), kw = make_inputs(AttnCase(1, 17, 17, 2, 1, head_dim, causal=True, alibi=True))
    out = M.attention(q, k, v, backend="triton", **kw)
    torch.testing.assert_close(out.double(), _ref(q, k, v, **kw), rtol=1e-5, atol=1e-5)
