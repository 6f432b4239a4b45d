"""``attention_varlen``'s ``seqused_q`` / ``seqused_k``: only the first rows of each sequence take part (a right-padded
batch run in place, ``padding.right_padded``; a static KV cache's filled lengths). Every backend against the float64
reference run on the used rows alone, the unused rows NaN-poisoned (``testing.check_seqused``)."""

import pytest
import torch

import mpt_attention as M
from mpt_attention.padding import right_padded
from mpt_attention.testing import assert_compiled_matches_eager, check_seqused, varlen_backend_and_slopes

BACKENDS = ["torch", "sdpa", "triton", "triton-atomic-dq"]

CASES = [  # (rows per sequence q, used q, rows per sequence k, used k, H_q, H_kv, D, causal, alibi)
    pytest.param([37, 37, 37, 37], [37, 20, 0, 5], [37, 37, 37, 37], [37, 20, 0, 5], 4, 4, 16, True, "heads",
                 id="right-padded-self-causal-alibi"),
    pytest.param([5, 1, 20, 9], None, [48, 48, 48, 48], [45, 3, 20, 9], 4, 2, 16, True, "batch",
                 id="static-cache-GQA-alibi-per-sequence"),
    pytest.param([16, 30], [9, 30], [40, 16], [40, 12], 4, 1, 32, False, "heads", id="cross-MQA-symmetric-alibi"),
    pytest.param([12, 7], [12, 2], [5, 7], [5, 0], 2, 2, 16, True, None, id="more-queries-than-keys-and-no-keys"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cap_q,used_q,cap_k,used_k,n_heads,n_kv,head_dim,causal,alibi", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_used_rows_match_the_reference_and_the_rest_are_zero(backend, cap_q, used_q, cap_k, used_k, n_heads, n_kv,
                                                             head_dim, causal, alibi, dtype):
    backend, extra, slopes = varlen_backend_and_slopes(backend, alibi, n_heads, len(cap_q))
    check_seqused(backend, cap_q, used_q, cap_k, used_k, n_heads, n_kv, head_dim, causal, slopes, dtype, **extra)


def _right_padded_batch(lengths, seq, n_heads=4, head_dim=16):
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(len(lengths), seq, n_heads, head_dim, generator=gen) for _ in range(3))
    keep = torch.arange(seq)[None, :] < torch.tensor(lengths)[:, None]
    return q, k, v, keep


def test_right_padded_gives_each_row_as_a_sequence():
    _, _, _, keep = _right_padded_batch([37, 20, 0], 37)
    cu, used, longest = right_padded(keep)
    assert cu.dtype == used.dtype == torch.int32
    assert cu.tolist() == [0, 37, 74, 111] and used.tolist() == [37, 20, 0] and longest == 37


@pytest.mark.parametrize("keep", [torch.tensor([[False, True, True]]), torch.tensor([[True, False, True]])],
                         ids=["left-padding", "a-gap"])
def test_right_padded_rejects_other_padding(keep):
    with pytest.raises(ValueError, match="not right padding"):
        right_padded(keep)


def test_right_padded_rejects_a_non_bool_mask():
    with pytest.raises(ValueError, match=r"keep must be bool \(B, S\), got torch.int64 \(2, 3\)"):
        right_padded(torch.ones(2, 3, dtype=torch.int64))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_right_padded_batch_in_place_equals_key_padding_on_its_real_rows(backend):
    """MPT's padded batch: ``attention(key_padding_mask=...)`` computes every row; run in place through ``seqused``,
    the real rows agree (causal ALiBi's MPT form and each sequence's own differ by a constant per row) and the
    padded rows are 0."""
    q, k, v, keep = _right_padded_batch([30, 20, 5], 37)  # the longest used rows (30) short of the rows (37)
    slopes = M.gen_slopes(4, return_1d=True)
    dense = M.attention(q, k, v, backend=backend, causal=True, alibi_slopes=slopes, key_padding_mask=keep)
    cu, used, longest = right_padded(keep)
    assert longest == 30
    flat = [x.flatten(0, 1) for x in (q, k, v)]
    out = M.attention_varlen(*flat, cu, cu, longest, longest, backend=backend, causal=True, alibi_slopes=slopes,
                             seqused_q=used, seqused_k=used).view_as(q)
    torch.testing.assert_close(out[keep], dense[keep], rtol=1e-5, atol=1e-5)
    assert torch.equal(out[~keep], torch.zeros_like(out[~keep]))


BAD_SEQUSED = [
    ("int64", dict(seqused_q=torch.tensor([3, 4])), r"seqused_q must be int32 \(B,\)=\(2,\) \(B = number of "
     r"sequences\), got torch.int64 \(2,\)"),
    ("wrong-count", dict(seqused_k=torch.tensor([3], dtype=torch.int32)), r"seqused_k must be int32 \(B,\)=\(2,\)"),
    ("past-the-end", dict(seqused_k=torch.tensor([4, 7], dtype=torch.int32)),
     r"seqused_k must be between 0 and each sequence's length .*got \[4, 7\], 1 past a sequence's end"),
    ("negative", dict(seqused_q=torch.tensor([-1, 2], dtype=torch.int32)),
     r"seqused_q must be between 0 and each sequence's length .*got \[-1, 2\]"),
    ("max-below-the-used-rows", dict(seqused_q=torch.tensor([4, 5], dtype=torch.int32), max_seqlen_q=4),
     r"max_seqlen_q=4 is shorter than the most rows a sequence uses \(5\)"),
]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("override,message", [pytest.param(o, m, id=i) for i, o, m in BAD_SEQUSED])
def test_bad_seqused_is_refused_before_any_kernel(backend, override, message):
    q, k, v = torch.randn(10, 2, 8), torch.randn(10, 2, 8), torch.randn(10, 2, 8)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)  # lengths 4 and 6
    with pytest.raises(ValueError, match=message):
        M.attention_varlen(q, k, v, cu, cu, backend=backend, **override)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_seqused_under_inference_mode(backend):
    """Inference tensors have no version counter: the used rows' check runs every call, and still refuses a
    ``seqused`` that an in-place write made too long."""
    with torch.inference_mode():
        q = torch.randn(26, 2, 16, generator=torch.Generator().manual_seed(0))
        cu = torch.tensor([0, 13, 26], dtype=torch.int32)
        used = torch.tensor([13, 6], dtype=torch.int32)
        out = M.attention_varlen(q, q, q, cu, cu, backend=backend, causal=True, seqused_q=used, seqused_k=used)
        ref = M.attention_varlen(q[:19], q[:19], q[:19], torch.tensor([0, 13, 19], dtype=torch.int32),
                                 torch.tensor([0, 13, 19], dtype=torch.int32), backend="torch", causal=True)
        torch.testing.assert_close(out[:19], ref, rtol=1e-4, atol=1e-4)
        assert torch.equal(out[19:], torch.zeros_like(out[19:]))
        used[1] = 14
        with pytest.raises(ValueError, match=r"seqused_q must be between 0 and each sequence's length"):
            M.attention_varlen(q, q, q, cu, cu, backend=backend, seqused_q=used)


def test_error_table_in_docs_lists_every_seqused_message():
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "errors.md").read_text()
    for phrase in ["seqused_q must be int32 (B,)", "must be between 0 and each sequence's length",
                   "past a sequence's end", "not right padding (padding.unpad packs any padding)"]:
        assert phrase in doc, f"docs/errors.md misses {phrase!r}"


def test_seqused_compiles_fullgraph_on_triton():
    q, k, v = (torch.randn(26, 2, 16).requires_grad_() for _ in range(3))
    cu = torch.tensor([0, 13, 26], dtype=torch.int32)
    used = torch.tensor([13, 6], dtype=torch.int32)

    def step(q, k, v):
        out, lse = M.attention_varlen(q, k, v, cu, cu, 13, 13, backend="triton", causal=True, return_lse=True,
                                      seqused_q=used, seqused_k=used)
        return out * 2.0, lse.clamp(min=-1e4)  # -inf rows: a finite stand-in for the comparison

    assert_compiled_matches_eager(step, [q, k, v])


def test_sequence_ends_follow_lengths_changed_in_place():
    """The kernels' end rows (``masks.sequence_ends``) are kept on ``seqused`` for its ``cu_seqlens``: a step's
    forward and backward share them, and lengths or offsets updated in place (a cache filled further, as a decode
    loop does) give new ones."""
    from mpt_attention.masks import sequence_ends

    cu = torch.tensor([0, 8, 16], dtype=torch.int32)
    used = torch.tensor([3, 8], dtype=torch.int32)
    first = sequence_ends(cu, used)
    assert first.tolist() == [3, 16] and sequence_ends(cu, used) is first
    used[0] = 5
    assert sequence_ends(cu, used).tolist() == [5, 16]
    cu[1:] += 1
    assert sequence_ends(cu, used).tolist() == [5, 17]
    with torch.inference_mode():
        frozen = torch.tensor([0, 8, 16], dtype=torch.int32)
    assert sequence_ends(frozen, used).tolist() == [5, 16]


def test_clear_unused_rows_zeroes_only_rows_past_each_sequences_used_ones():
    """The Hopper forward's unused output rows (``hopper.clear_unused_rows``, under the interpreter here): rows in
    ``[cu[b] + used[b], cu[b + 1])`` become 0, every other row (used ones, and rows past the last sequence) keeps its
    value, over odd lengths, an empty sequence and one wholly unused."""
    pytest.importorskip("triton")
    from mpt_attention.impl.triton import hopper
    from mpt_attention.masks import sequence_ends

    cu = torch.tensor([0, 37, 37, 134, 211, 300], dtype=torch.int32)
    used = torch.tensor([5, 0, 97, 0, 89], dtype=torch.int32)
    x = torch.randn(311, 3, 40)
    expected = x.clone()
    for start, end, u in zip(cu[:-1].tolist(), cu[1:].tolist(), used.tolist()):
        expected[start + u:end] = 0
    hopper.clear_unused_rows(x, cu, sequence_ends(cu, used))
    assert torch.equal(x, expected)


def _packed_lengths():
    """Odd capacities with an empty sequence, a wholly unused one and rows past the last sequence (T = 311)."""
    cu = torch.tensor([0, 37, 37, 134, 211, 300], dtype=torch.int32)
    used = torch.tensor([5, 0, 97, 0, 89], dtype=torch.int32)
    rows_used = torch.zeros(311, dtype=torch.bool)
    for start, u in zip(cu[:-1].tolist(), used.tolist()):
        rows_used[start:start + u] = True
    return cu, used, rows_used


def test_dq_from_sums_casts_the_used_rows_and_zeroes_the_rest():
    """The fused Hopper backward's dQ with unused query rows (``common.dq_from_sums_kernel``, under the interpreter):
    each used row's float32 sums in dQ's dtype, zeros everywhere else; the unused rows' sums (never zeroed: NaN
    here) are not read, and no row of the poisoned output stays unwritten."""
    pytest.importorskip("triton")
    from mpt_attention.impl.triton import hopper
    from mpt_attention.impl.triton.common import dq_from_sums_kernel
    from mpt_attention.masks import sequence_ends

    cu, used, rows_used = _packed_lengths()
    sums = torch.randn(311, 3, 40)
    sums[~rows_used] = float("nan")
    dq = torch.full((311, 3, 40), float("nan"), dtype=torch.float16)
    cast, scalars = hopper.packed_rows_launch(dq_from_sums_kernel, dq.shape, cu.numel() - 1)
    cast(dq, sums, cu, sequence_ends(cu, used), dq.stride(0), dq.stride(1), sums.stride(0), sums.stride(1), *scalars)
    expected = torch.where(rows_used[:, None, None], sums, 0.0).to(torch.float16)
    assert torch.equal(dq, expected)


def test_delta_kernel_reads_only_the_used_rows():
    """The backward's row terms for packed queries with unused rows (``USED_ROWS``): used rows' delta rowsum(dO * O)
    and zeroed dQ sums; the unused rows (O and dO NaN) get delta 0 and keep whatever their sums held."""
    pytest.importorskip("triton")
    from mpt_attention.impl.triton import plans
    from mpt_attention.masks import sequence_ends

    cu, used, rows_used = _packed_lengths()
    out, dout = torch.randn(311, 3, 40), torch.randn(311, 3, 40)
    out[~rows_used], dout[~rows_used] = float("nan"), float("nan")
    lse = torch.randn(3, 311)
    delta = torch.full((3, 311), float("nan"))
    sums = torch.full((311, 3, 40), 7.0)
    plans.row_terms(out, dout, lse, None, delta, varlen=True, dq_zero=sums, used_rows=(cu, sequence_ends(cu, used)))
    want = torch.where(rows_used[None, :], (out.double() * dout.double()).sum(-1).T.nan_to_num(), 0.0).float()
    torch.testing.assert_close(delta, want)
    assert torch.equal(sums, torch.where(rows_used[:, None, None], 0.0, 7.0).expand_as(sums))
