"""``key_padding_mask`` as a bias row over the keys (impl/triton/key_padding.py: the route that takes the mask to
the Hopper kernels, which read no mask). On the CPU the route is forced onto the general kernels (interpreter):
they then read the row and the zeroed K and V instead of the mask, and must give the mask's answer, garbage in the
padded keys included."""

import pytest
import torch

import mpt_attention as M
from mpt_attention.impl.triton import key_padding, launch
from mpt_attention.kept import kept_values
from mpt_attention.testing import (AttnCase, assert_close_to_reference, assert_gradients_close_to_reference,
                                   make_inputs, reference_attention)

pytest.importorskip("triton")

LOG2E = 1.4426950408889634

ROUTE_CASES = [
    AttnCase(2, 37, 37, 4, 4, 32, causal=True, alibi=True, padding=True),
    AttnCase(3, 45, 45, 4, 2, 16, causal=True, alibi=True, padding="left"),  # rows that see no key: 0
    AttnCase(2, 17, 45, 4, 2, 32, causal=True, alibi=True, padding=True),  # chunked prefill after a cache
    AttnCase(2, 33, 33, 2, 1, 16, padding=True),  # non-causal without ALiBi, MQA
    AttnCase(2, 29, 29, 4, 2, 16, causal=True, padding="left"),
]


@pytest.fixture
def forced_route(monkeypatch):
    """The route taken wherever its inputs allow, whatever the device; its calls counted."""
    calls = []
    as_bias_row = key_padding.as_bias_row

    def counted(*args):
        calls.append(args[2].shape)
        return as_bias_row(*args)
    monkeypatch.setattr(key_padding, "hopper_applies", lambda *args: True)
    monkeypatch.setattr(key_padding, "as_bias_row", counted)
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", ROUTE_CASES, ids=lambda c: c.id())
def test_key_padding_as_a_bias_row_gives_the_masks_answer_and_gradients(forced_route, case, dtype):
    (q, k, v), kw = make_inputs(case, dtype=dtype)
    kpm = kw["key_padding_mask"]
    # garbage in the padded keys: the route reads them (zeroed copies), the mask's kernels never do
    pad = ~kpm.view(case.batch, case.s_k, 1, 1)
    k_dirty, v_dirty = k.masked_fill(pad, float("nan")), v.masked_fill(pad, float("inf"))
    inputs = [x.clone().requires_grad_() for x in (q, k_dirty, v_dirty)]
    out = M.attention(*inputs, backend="triton", **kw)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, inputs, dout)
    assert len(forced_route) == 2  # forward and backward took the route
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
    for g in grads[1:]:  # a padded key's probability is exactly 0: so are its gradients
        assert (g.masked_select(pad.expand_as(g)) == 0).all()
    clean = [x.detach() for x in (q, k, v)]  # the reference reads the clean tensors: the same answer
    assert_gradients_close_to_reference(out, grads, clean, kw, dout, dtype)


def test_route_is_taken_only_where_a_row_expresses_the_call(forced_route):
    (q, k, v), kw = make_inputs(AttnCase(2, 37, 37, 4, 2, 16, causal=True, alibi=True, padding=True))
    kpm, slopes = kw["key_padding_mask"], kw["alibi_slopes"]
    takes = key_padding.takes_hopper
    assert takes(q, k, v, None, slopes, kpm, None, None, 0.0, True, None)
    assert takes(q, k, v, None, None, kpm, None, None, 0.0, False, None)
    assert not takes(q, k, v, None, slopes, kpm, None, None, 0.0, False, None)  # symmetric ALiBi: not per key
    assert not takes(q, k, v, None, None, None, None, None, 0.0, True, None)  # no mask
    bias = torch.zeros(1, 4, 1, 37)
    assert not takes(q, k, v, bias, None, kpm, None, None, 0.0, True, None)  # another bias (its gradient)
    assert not takes(q, k, v, None, None, kpm, torch.zeros(2, 37, dtype=torch.long), None, 0.0, True, None)
    assert not takes(q, k, v, None, None, kpm, None, torch.ones(2, 37, dtype=torch.bool), 0.0, True, None)
    assert not takes(q, k, v, None, None, kpm, None, None, 0.1, True, None)  # dropout


@pytest.mark.parametrize("slopes_shape", [None, (4,), (2, 4)], ids=["no-alibi", "slopes-per-head", "slopes-per-batch"])
def test_bias_row_holds_the_kernels_alibi_terms_and_removes_padded_keys(slopes_shape):
    batch, s_k, n_heads, n_kv, dim = 2, 37, 4, 2, 16
    k, v = (torch.randn(batch, s_k, n_kv, dim) for _ in range(2))
    kpm = torch.ones(batch, s_k, dtype=torch.bool)
    kpm[0, 30:] = False
    kpm[1, :5] = False
    slopes = None if slopes_shape is None else torch.rand(slopes_shape)
    k_kept, v_kept, rows = key_padding.as_bias_row(k, v, kpm, slopes, n_heads)
    assert rows.shape == (batch, 1 if slopes is None else n_heads, 1, s_k) and rows.dtype == torch.float32
    assert rows.stride(-2) % 4 == 0  # rows of 16-byte multiples, as the copy engine reads them
    dist = torch.arange(s_k, dtype=torch.float32) - (s_k - 1)
    expected = torch.zeros(batch, rows.shape[1], 1, s_k)
    if slopes is not None:  # as the kernels form it: the slope in log2 units, then times the distance
        expected = (slopes.float() * LOG2E).view(-1, n_heads, 1, 1) * dist + expected
    expected = expected.masked_fill(~kpm.view(batch, 1, 1, s_k), float("-inf"))
    assert torch.equal(rows, expected)
    pad = ~kpm.view(batch, s_k, 1, 1)
    for kept, x in ((k_kept, k), (v_kept, v)):
        assert torch.equal(kept, x.masked_fill(pad, 0.0))
        assert kept.stride() == launch.head_contiguous(x).stride()


@pytest.mark.parametrize("layout", ["contiguous", "heads-first", "cache-slice"])
def test_kept_keys_zero_padded_rows_in_any_layout(layout):
    """kept_keys_kernel on K and V views as callers hand them: (B, H, S, D) memory seen as (B, S, H, D), and a slice
    of a longer cache; D not a power of 2, S odd; NaN and inf in the padded rows never reach the copies."""
    batch, s_k, n_kv, dim = 3, 37, 2, 24
    if layout == "heads-first":
        k, v = (torch.randn(batch, n_kv, s_k, dim).transpose(1, 2) for _ in range(2))
    elif layout == "cache-slice":
        k, v = (torch.randn(batch, 50, n_kv, dim)[:, 5:5 + s_k] for _ in range(2))
    else:
        k, v = (torch.randn(batch, s_k, n_kv, dim) for _ in range(2))
    kpm = torch.rand(batch, s_k, generator=torch.Generator().manual_seed(0)) < 0.6
    pad = ~kpm.view(batch, s_k, 1, 1)
    k.masked_fill_(pad, float("nan"))
    v.masked_fill_(pad, float("inf"))
    k_kept, v_kept = key_padding.kept_keys(k, v, kpm)
    for kept, x in ((k_kept, k), (v_kept, v)):
        assert kept.stride() == torch.empty_like(x).stride()
        assert torch.equal(kept, x.masked_fill(pad, 0.0))


def test_route_keeps_one_row_per_mask_and_slopes(forced_route):
    """A model hands one mask and one slopes tensor to all its layers: the route's row is made once and kept on the
    mask (with its prefix maxima, ends and key terms kept on the row); a change to the slopes, in place or another
    tensor, makes a new one, and every call keeps the mask's answer."""
    (q, k, v), kw = make_inputs(AttnCase(2, 37, 37, 4, 2, 16, causal=True, alibi=True, padding=True))
    kpm, slopes = kw["key_padding_mask"], kw["alibi_slopes"]

    def check(k, slopes):
        out = M.attention(q, k, v, backend="triton", causal=True, alibi_slopes=slopes, key_padding_mask=kpm)
        ref, _ = reference_attention(q.double(), k.double(), v.double(), causal=True, alibi_slopes=slopes,
                                     key_padding_mask=kpm)
        low, _ = reference_attention(q, k, v, causal=True, alibi_slopes=slopes, key_padding_mask=kpm,
                                     compute_dtype=q.dtype)
        assert_close_to_reference("out", out, ref, low)
        return kept_values(kpm, "_mpt_attention_kpm_row")

    first = check(k, slopes)
    assert len(first) == 1
    again = check(2 * k, slopes)  # another layer: the same row object
    assert len(again) == 1 and again[0] is first[0]
    slopes.mul_(0.5)
    assert len(check(k, slopes)) == 2
    assert len(check(k, slopes.clone())) == 3
