"""ALiBi slopes and biases, MPT's bias builders and its model-level mask construction."""

import pytest
import torch

import mpt_attention as M
from mpt_attention.masks import alibi_bias, keep_mask

SLOPE_TABLE = {
    1: [0.00390625],
    2: [0.0625, 0.00390625],
    3: [0.0625, 0.00390625, 0.25],
    4: [0.25, 0.0625, 0.015625, 0.00390625],
    6: [0.25, 0.0625, 0.015625, 0.00390625, 0.5, 0.125],
    8: [0.5, 0.25, 0.125, 0.0625, 0.03125, 0.015625, 0.0078125, 0.00390625],
    12: [0.5, 0.25, 0.125, 0.0625, 0.03125, 0.015625, 0.0078125, 0.00390625,
         0.70710677, 0.35355338, 0.17677669, 0.088388346],
}


@pytest.mark.parametrize("n_heads", sorted(SLOPE_TABLE), ids=lambda n: f"H{n}")
def test_gen_slopes_table(n_heads):
    slopes = M.gen_slopes(n_heads)
    assert slopes.shape == (1, n_heads, 1, 1) and slopes.dtype == torch.float32
    torch.testing.assert_close(slopes.flatten(), torch.tensor(SLOPE_TABLE[n_heads]), rtol=1e-7, atol=0)


def test_gen_slopes_16_and_32_heads():
    torch.testing.assert_close(M.gen_slopes(16, return_1d=True), 2.0 ** (-torch.arange(1, 17) / 2), rtol=1e-6, atol=0)
    torch.testing.assert_close(M.gen_slopes(32, return_1d=True), 2.0 ** (-torch.arange(1, 33) / 4), rtol=1e-6, atol=0)


def test_alibi_matches_bloom_for_1_to_63_heads():
    bloom = pytest.importorskip("transformers.models.bloom.modeling_bloom")
    for n_heads in range(1, 64):
        for seq_len in (1, 2, 8, 13, 64, 195, 256):
            ours = M.build_alibi_bias(n_heads, seq_len, dtype=torch.float32)[0]
            theirs = bloom.build_alibi_tensor(torch.ones(1, seq_len), n_heads, torch.float32).view(n_heads, 1, seq_len)
            torch.testing.assert_close(ours, theirs - theirs.amax(dim=-1, keepdim=True))


def test_build_alibi_bias_forms():
    causal = M.build_alibi_bias(4, 5)
    assert causal.shape == (1, 4, 1, 5)
    torch.testing.assert_close(causal[0, 0, 0], torch.tensor([-1.0, -0.75, -0.5, -0.25, 0.0]))
    full = M.build_alibi_bias(4, 5, full=True)
    assert full.shape == (1, 4, 5, 5)
    torch.testing.assert_close(full, full.transpose(-1, -2))
    assert (full.diagonal(dim1=-2, dim2=-1) == 0).all()
    assert M.build_alibi_bias(4, 5, dtype=torch.float16).dtype == torch.float16


@pytest.mark.parametrize("s_q,s_k", [(5, 5), (1, 9), (3, 9), (9, 9)])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_alibi_from_slopes_is_the_window_of_mpts_bias(s_q, s_k, causal):
    max_len = 12
    mpt = M.build_alibi_bias(6, max_len, full=not causal)
    window = mpt[:, :, max(0, mpt.shape[2] - s_q):, max_len - s_k:]
    ours = alibi_bias(M.gen_slopes(6, return_1d=True), s_q, s_k, causal)
    torch.testing.assert_close(ours.expand(window.shape), window.expand(ours.shape) if causal else window)


@pytest.mark.parametrize(
    "impl,alibi,prefix_lm,causal,seq_id,expected",
    [
        ("flash", True, True, True, True, None),
        ("torch", True, False, True, False, (1, 4, 1, 16)),
        ("triton", True, True, True, False, (1, 4, 16, 16)),
        ("sdpa", True, False, False, False, (1, 4, 16, 16)),
        ("torch", True, False, True, True, (1, 4, 16, 16)),
        ("torch", False, True, True, False, (1, 1, 16, 16)),
        ("triton", False, False, True, True, (1, 1, 16, 16)),
        ("torch", False, False, False, False, None),
    ],
)
def test_attn_bias_shape_table(impl, alibi, prefix_lm, causal, seq_id, expected):
    assert M.attn_bias_shape(impl, 4, 16, alibi, prefix_lm, causal, seq_id) == expected


def test_invalid_attn_impl_in_bias_builders():
    with pytest.raises(ValueError, match=r"attn_impl='nope' is an invalid setting\."):
        M.attn_bias_shape("nope", 4, 16, True, False, True, False)
    with pytest.raises(ValueError, match=r"attn_impl='nope' is an invalid setting\."):
        M.build_attn_bias("nope", torch.zeros(1), 4, 16)


def test_build_attn_bias_adds_alibi():
    zeros = torch.zeros(1, 4, 1, 16)
    torch.testing.assert_close(M.build_attn_bias("torch", zeros, 4, 16, causal=True, alibi=True),
                               M.build_alibi_bias(4, 16))
    assert M.build_attn_bias("flash", zeros, 4, 16, alibi=True) is None
    assert M.build_attn_bias("torch", zeros, 4, 16, alibi=False) is zeros


def test_prefix_and_sequence_id_mask_matrix():
    """The seed's worked example: prefix [1,1,0,0,1,1,1,0] with sequence ids [0,0,0,0,1,1,1,1]."""
    bias = M.build_mpt_attn_bias(
        "torch", 1, 256, prefix_lm=True, attn_uses_sequence_id=True,
        prefix_mask=torch.tensor([[1, 1, 0, 0, 1, 1, 1, 0]]).bool(),
        sequence_id=torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1]]),
    )
    keep_rows = [{0, 1}, {0, 1}, {0, 1, 2}, {0, 1, 2, 3}, {4, 5, 6}, {4, 5, 6}, {4, 5, 6}, {4, 5, 6, 7}]
    expected = torch.full((8, 8), torch.finfo(torch.float32).min)
    for i, keep in enumerate(keep_rows):
        expected[i, sorted(keep)] = 0.0
    assert bias.shape == (1, 1, 8, 8)
    assert torch.equal(bias[0, 0], expected)


def test_build_mpt_attn_bias_padding_and_alibi():
    mask = torch.tensor([[False, True, True, True], [True, True, True, True]])
    bias = M.build_mpt_attn_bias("torch", 4, 16, alibi=True, attention_mask=mask)
    assert bias.shape == (2, 4, 1, 4)
    assert (bias[0, :, :, 0] == torch.finfo(torch.float32).min).all()
    torch.testing.assert_close(bias[1], M.build_alibi_bias(4, 16)[0, :, :, -4:])
    assert M.build_mpt_attn_bias("flash", 4, 16, alibi=True, attention_mask=mask) is None
    assert M.build_mpt_attn_bias("torch", 4, 16) is None


def test_build_mpt_attn_bias_errors():
    with pytest.raises(ValueError, match="prefix_mask is a required argument"):
        M.build_mpt_attn_bias("torch", 1, 8, prefix_lm=True)
    with pytest.raises(ValueError, match="prefix_mask sequence length cannot exceed max_seq_len=8"):
        M.build_mpt_attn_bias("torch", 1, 8, prefix_lm=True, prefix_mask=torch.ones(1, 9, dtype=torch.bool))
    with pytest.raises(ValueError, match="sequence_id sequence length cannot exceed max_seq_len=8"):
        M.build_mpt_attn_bias("torch", 1, 8, attn_uses_sequence_id=True,
                              sequence_id=torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="are not equal"):
        M.build_mpt_attn_bias("torch", 1, 8, prefix_lm=True, prefix_mask=torch.ones(1, 4, dtype=torch.bool),
                              attention_mask=torch.ones(1, 5, dtype=torch.bool))


def test_keep_mask_bottom_right_causal():
    keep = keep_mask(1, 2, 5, causal=True)[0, 0]
    assert keep.tolist() == [[True, True, True, True, False], [True, True, True, True, True]]
    assert not keep_mask(1, 4, 2, causal=True)[0, 0, :2].any()  # S_q > S_k: the first rows see nothing
