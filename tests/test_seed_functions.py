"""The seed-compatible functions: layouts, caches, bias windows, masks, messages, and the fixed quirks."""

import warnings

import pytest
import torch

import mpt_attention as M
from mpt_attention.testing import reference_attention

FNS = {
    "torch": M.scaled_multihead_dot_product_attention,
    "sdpa": M.sdpa_attn_fn,
    "triton": M.triton_flash_attn_fn,
}
PACKED_CACHE = ("sdpa", "triton")


def packed(b, s, heads, d, dtype=torch.float32, requires_grad=False):
    return torch.randn(b, s, heads * d, dtype=dtype).requires_grad_(requires_grad)


def unpack(x, heads):
    b, s, w = x.shape
    return x.view(b, s, heads, w // heads)


@pytest.mark.parametrize("impl", list(FNS))
@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_matches_float64_reference(impl, kv_heads, causal):
    b, s, h, d = 2, 37, 4, 16
    q, k, v = packed(b, s, h, d), packed(b, s, kv_heads, d), packed(b, s, kv_heads, d)
    bias = M.build_alibi_bias(h, 64, full=not causal)
    mask = torch.ones(b, s, dtype=torch.bool)
    mask[1, -5:] = False  # right padding: every query keeps a live key
    out, weights, cache = FNS[impl](q, k, v, h, attn_bias=bias, key_padding_mask=mask, is_causal=causal,
                                    kv_n_heads=kv_heads)
    assert weights is None and cache is None
    window = bias[:, :, -s:, -s:]
    ref, _ = reference_attention(unpack(q, h), unpack(k, kv_heads), unpack(v, kv_heads), causal=causal,
                                 attn_bias=window, key_padding_mask=mask)
    # fully masked rows are the one documented difference between backends; none here
    torch.testing.assert_close(out, ref.reshape(b, s, h * d).float(), rtol=1e-5, atol=2e-5)


def test_torch_weights_are_exactly_zero_where_masked():
    b, s, h, d = 2, 9, 2, 8
    q, k, v = packed(b, s, h, d), packed(b, s, h, d), packed(b, s, h, d)
    mask = torch.ones(b, s, dtype=torch.bool)
    mask[0, 6:] = False
    _, weights, _ = M.scaled_multihead_dot_product_attention(q, k, v, h, key_padding_mask=mask, is_causal=True,
                                                             needs_weights=True)
    masked = torch.triu(torch.ones(s, s, dtype=torch.bool), 1).view(1, 1, s, s) | ~mask.view(b, 1, 1, s)
    live_rows = torch.ones(b, 1, s, 1, dtype=torch.bool)
    assert (weights.masked_select(masked & live_rows) == 0).all()
    assert (weights.masked_select(~masked) > 0).all()


def test_torch_causal_alignment_with_fewer_queries():
    b, h, d = 1, 1, 8
    q, k, v = packed(b, 2, h, d), packed(b, 5, h, d), packed(b, 5, h, d)
    _, weights, _ = M.scaled_multihead_dot_product_attention(q, k, v, h, is_causal=True, needs_weights=True)
    assert (weights[0, 0] > 0).tolist() == [[True, True, True, True, False], [True] * 5]
    _, weights, _ = M.scaled_multihead_dot_product_attention(q[:, :1], k, v, h, is_causal=True, needs_weights=True)
    assert (weights > 0).all()  # one query token sees every cached key


@pytest.mark.parametrize("impl", list(FNS))
@pytest.mark.parametrize("kv_heads", [4, 1], ids=["mha", "mqa"])
def test_cache_layouts_and_prefill_then_steps(impl, kv_heads):
    b, h, d, n, steps = 2, 4, 8, 5, 3
    total = n + steps
    q, k, v = packed(b, total, h, d), packed(b, total, kv_heads, d), packed(b, total, kv_heads, d)
    bias = M.build_alibi_bias(h, 16)
    fn = FNS[impl]
    full, _, _ = fn(q, k, v, h, attn_bias=bias, is_causal=True, kv_n_heads=kv_heads)
    out, _, cache = fn(q[:, :n], k[:, :n], v[:, :n], h, past_key_value=(), attn_bias=bias, is_causal=True,
                       kv_n_heads=kv_heads)
    outs = [out]
    for t in range(n, total):
        before = [c.clone() for c in cache]
        out, _, new_cache = fn(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], h, past_key_value=cache, attn_bias=bias,
                               is_causal=True, kv_n_heads=kv_heads)
        assert all(torch.equal(c, x) for c, x in zip(cache, before)), "the passed cache was modified"
        cache = new_cache
        outs.append(out)
    if impl == "torch":
        assert cache[0].shape == (b, kv_heads, d, total) and cache[1].shape == (b, kv_heads, total, d)
    else:
        assert cache[0].shape == cache[1].shape == (b, total, kv_heads * d)
    torch.testing.assert_close(torch.cat(outs, dim=1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", list(FNS))
def test_chunked_prefill_with_cache(impl):
    b, h, d = 1, 2, 16
    q, k, v = packed(b, 11, h, d), packed(b, 11, h, d), packed(b, 11, h, d)
    fn = FNS[impl]
    full, _, _ = fn(q, k, v, h, is_causal=True)
    _, _, cache = fn(q[:, :4], k[:, :4], v[:, :4], h, past_key_value=(), is_causal=True)
    chunk, _, _ = fn(q[:, 4:], k[:, 4:], v[:, 4:], h, past_key_value=cache, is_causal=True)
    torch.testing.assert_close(chunk, full[:, 4:], rtol=1e-5, atol=1e-5)


def test_bias_window_and_broadcast_error():
    b, s, h, d = 1, 4, 2, 8
    q, k, v = packed(b, s, h, d), packed(b, s, h, d), packed(b, s, h, d)
    bias = M.build_alibi_bias(h, 32)
    for fn in FNS.values():
        a, _, _ = fn(q, k, v, h, attn_bias=bias, is_causal=True)
        c, _, _ = fn(q, k, v, h, attn_bias=bias[..., -s:], is_causal=True)
        torch.testing.assert_close(a, c)
        with pytest.raises(RuntimeError, match=r"attn_bias \(shape: torch.Size\(\[1, 2, 1, 3\]\)\) is expected to "
                                               r"broadcast to shape: torch.Size\(\[1, 2, 4, 4\]\)\."):
            fn(q, k, v, h, attn_bias=torch.zeros(1, h, 1, 3))


def test_padding_warnings():
    b, s, h, d = 1, 4, 2, 8
    q, k, v = packed(b, s, h, d), packed(b, s, h, d), packed(b, s, h, d)
    mask = torch.ones(b, s, dtype=torch.bool)
    with pytest.warns(UserWarning, match="^Propogating key_padding_mask"):
        M.scaled_multihead_dot_product_attention(q, k, v, h, attn_bias=torch.zeros(1, h, 1, s), key_padding_mask=mask)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        M.scaled_multihead_dot_product_attention(q, k, v, h, key_padding_mask=mask)
        M.triton_flash_attn_fn(q, k, v, h, attn_bias=torch.zeros(1, h, 1, s), key_padding_mask=mask)


def test_float32_bias_promotes_weights_not_output():
    b, s, h, d = 1, 4, 2, 8
    q, k, v = (packed(b, s, h, d, dtype=torch.float16) for _ in range(3))
    out, weights, _ = M.scaled_multihead_dot_product_attention(q, k, v, h, attn_bias=torch.zeros(1, h, 1, s),
                                                               needs_weights=True)
    assert weights.dtype == torch.float32 and out.dtype == torch.float16


@pytest.mark.parametrize("impl", list(FNS))
def test_softmax_scale_zero_is_honoured(impl):
    b, s, h, d = 1, 6, 2, 8
    q, k, v = packed(b, s, h, d), packed(b, s, h, d), packed(b, s, h, d)
    out, _, _ = FNS[impl](q, k, v, h, softmax_scale=0.0)
    mean_v = v.view(b, s, h, d).mean(dim=1, keepdim=True).expand(b, s, h, d).reshape(b, s, h * d)
    torch.testing.assert_close(out, mean_v, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", list(FNS))
def test_dropout_in_eval_is_a_no_op(impl):
    b, s, h, d = 1, 6, 2, 8
    q, k, v = packed(b, s, h, d), packed(b, s, h, d), packed(b, s, h, d)
    plain, _, _ = FNS[impl](q, k, v, h, is_causal=True)
    evaluated, _, _ = FNS[impl](q, k, v, h, is_causal=True, dropout_p=0.5, training=False)
    torch.testing.assert_close(evaluated, plain)


@pytest.mark.parametrize("impl", ["sdpa", "triton"])
def test_fused_backends_refuse_weights(impl):
    q = packed(1, 4, 2, 8)
    with pytest.raises(NotImplementedError, match=f"attn_impl: {impl} cannot return attn weights."):
        FNS[impl](q, q, q, 2, needs_weights=True)


def test_flash_is_absent_and_says_so():
    q = packed(1, 4, 2, 8)
    with pytest.raises(NotImplementedError, match="'flash' backend .* not implemented yet"):
        M.flash_attn_fn(q, q, q, 2)


def test_mqa_head_dim_8_has_no_nan_on_triton():
    """llm-foundry #442: the seed's triton MQA (expand) gave NaN at head_dim 8."""
    b, s, h, d = 2, 17, 16, 8
    q, k, v = packed(b, s, h, d, torch.float16), packed(b, s, 1, d, torch.float16), packed(b, s, 1, d, torch.float16)
    out, _, _ = M.triton_flash_attn_fn(q, k, v, h, multiquery=True, is_causal=True,
                                       attn_bias=M.build_alibi_bias(h, s))
    assert torch.isfinite(out).all()


def test_torch_gradcheck_float64():
    b, s, h, d = 1, 5, 2, 4
    q, k, v = (packed(b, s, h, d, torch.float64, requires_grad=True) for _ in range(3))
    bias = torch.randn(1, h, 1, s, dtype=torch.float64, requires_grad=True)

    def fn(q, k, v, bias):
        return M.scaled_multihead_dot_product_attention(q, k, v, h, attn_bias=bias, is_causal=True)[0]

    assert torch.autograd.gradcheck(fn, (q, k, v, bias))


def test_torch_dropout_in_training_drops():
    b, s, h, d = 1, 64, 1, 8
    q, k, v = packed(b, s, h, d), packed(b, s, h, d), packed(b, s, h, d)
    _, weights, _ = M.scaled_multihead_dot_product_attention(q, k, v, h, dropout_p=0.5, training=True,
                                                             needs_weights=True)
    dropped = (weights == 0).float().mean().item()
    assert 0.4 < dropped < 0.6
