"""Values kept on input tensors between calls (``mpt_attention.kept``): reused while the tensor is unchanged, made
again after any in-place write, and through the triton backend, MPT's bias row written in place between calls."""

import pytest
import torch

import mpt_attention as M
from mpt_attention.kept import kept_on, kept_values
from mpt_attention.testing import AttnCase, make_inputs, reference_attention


def _counter():
    made = []
    return lambda: made.append(1) or len(made)


def test_a_kept_value_is_reused_until_the_tensor_or_the_key_changes():
    t, make = torch.zeros(2, 4), _counter()
    assert [kept_on(t, "_probe", make) for _ in range(2)] == [1, 1]
    t.add_(1)
    assert kept_on(t, "_probe", make) == 2
    t[1, 1:3].mul_(2)  # through a view: views share the counter
    assert kept_on(t, "_probe", make) == 3
    assert kept_on(t, "_probe", make, key=0.5) == 4
    assert kept_on(t, "_probe", make, key=0.5) == 4


def test_views_of_one_base_share_values_by_geometry_and_see_writes_to_the_base():
    base, make = torch.zeros(3, 8), _counter()
    row = base[1, :5]
    assert [kept_on(row, "_probe", make) for _ in range(2)] == [1, 1]
    assert kept_on(base[1, :5], "_probe", make) == 1  # a new view of the same part: as MPT slices per layer
    assert kept_on(base[1, 3:], "_probe", make) == 2  # another part
    assert kept_on(base[1, :5][:], "_probe", make) == 1  # a view of a view
    base[2].fill_(7.0)  # another part of the storage: made again (the counter is the storage's)
    assert kept_on(row, "_probe", make) == 3


def test_inference_tensors_keep_nothing():
    with torch.inference_mode():
        t = torch.zeros(3)
    make = _counter()
    assert [kept_on(t, "_probe", make) for _ in range(2)] == [1, 2]
    assert not hasattr(t, "_probe")


@pytest.mark.parametrize("write", ["bias", "base"], ids=["bias-written", "its-buffer-written"])
def test_a_bias_row_written_in_place_reaches_the_kernels(write):
    """MPT's (1, H, 1, S) row is converted once and kept on the tensor (``launch._log2_bias_rows``); a write to it, or
    to the buffer it is a slice of (MPT slices one ALiBi buffer per step), is seen by the next call."""
    case = AttnCase(2, 37, 37, 4, 2, 16, causal=True, bias="vector")
    (q, k, v), kw = make_inputs(case)
    buffer = torch.zeros(1, case.n_heads, 1, 48)
    buffer[..., :37] = kw["attn_bias"]
    bias = buffer[..., :37]
    first = M.attention(q, k, v, backend="triton", causal=True, attn_bias=bias)
    [rows] = kept_values(bias, "_mpt_attention_bias_rows")
    M.attention(q, k, v, backend="triton", causal=True, attn_bias=buffer[..., :37])  # another layer's slice
    again = kept_values(bias, "_mpt_attention_bias_rows")
    assert len(again) == 1 and again[0] is rows  # not converted again
    if write == "bias":
        bias[..., 5:20].mul_(-3.0)
    else:
        buffer[..., :37] = torch.linspace(-4.0, 0.0, 37)
    out = M.attention(q, k, v, backend="triton", causal=True, attn_bias=bias)
    ref, _ = reference_attention(q, k, v, causal=True, attn_bias=bias)
    assert kept_values(bias, "_mpt_attention_bias_rows")[0] is not rows
    assert (out - ref).abs().max().item() < 1e-5
    assert (first - out).abs().max().item() > 1e-2  # the write changed the answer
