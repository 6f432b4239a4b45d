"""attention_varlen: packed sequences of different lengths (cu_seqlens), on every backend, against
the float64 reference run on each sequence alone; and its agreement with the padded layout."""

import pytest
import torch

import mpt_attention as M
from mpt_attention import ops
from mpt_attention.kept import kept_values
from mpt_attention.padding import pad, unpad
from mpt_attention.testing import (
    assert_close_to_reference, assert_compiled_matches_eager, make_varlen_inputs, reference_attention,
    reference_attention_varlen, varlen_backend_and_slopes,
)

BACKENDS = ["torch", "sdpa", "triton"]


def _cu(lengths):
    return torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32)


CASES = [  # (lens_q, lens_k, H_q, H_kv, D, causal, alibi)
    pytest.param([37, 1, 20], [37, 1, 20], 4, 4, 16, True, "heads", id="self-causal-alibi-MHA"),
    pytest.param([37, 0, 20, 5], [45, 3, 20, 9], 4, 2, 16, True, "batch", id="chunked-prefill-GQA-alibi-per-seq"),
    pytest.param([9, 30], [40, 12], 4, 1, 32, False, "heads", id="cross-MQA-symmetric-alibi"),
    pytest.param([12, 7], [5, 7], 2, 2, 16, True, None, id="more-queries-than-keys"),
    pytest.param([33, 0], [0, 33], 2, 1, 8, True, None, id="empty-sequences"),
]


@pytest.mark.parametrize("backend", BACKENDS + ["triton-atomic-dq"])
@pytest.mark.parametrize("lens_q,lens_k,n_heads,n_kv,head_dim,causal,alibi", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_varlen_matches_each_sequence_alone(backend, lens_q, lens_k, n_heads, n_kv, head_dim, causal, alibi, dtype):
    q, k, v, cu_q, cu_k = make_varlen_inputs(lens_q, lens_k, n_heads, n_kv, head_dim, dtype, requires_grad=True)
    backend, extra, slopes = varlen_backend_and_slopes(backend, alibi, n_heads, len(lens_q))
    kw = dict(causal=causal)
    out = M.attention_varlen(q, k, v, cu_q, cu_k, backend=backend, alibi_slopes=slopes, **kw, **extra)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)

    inputs64 = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref, _ = reference_attention_varlen(*inputs64, cu_q, cu_k, alibi_slopes=slopes, **kw)
    ref_grads = torch.autograd.grad(ref, inputs64, dout.double())
    low_inputs = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    low, _ = reference_attention_varlen(*low_inputs, cu_q, cu_k, alibi_slopes=slopes, compute_dtype=dtype, **kw)
    low_grads = torch.autograd.grad(low, low_inputs, dout.to(low.dtype))

    assert out.shape == q.shape and out.dtype == dtype
    assert_close_to_reference("out", out, ref, low)
    for name, g, r, lo in zip(["dq", "dk", "dv"], grads, ref_grads, low_grads):
        assert_close_to_reference(name, g, r, lo)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_varlen_log_sum_exp_is_heads_by_tokens(backend):
    q, k, v, cu_q, cu_k = make_varlen_inputs([12, 0, 7], [15, 4, 3], 2, 1, 16)
    _, lse = M.attention_varlen(q, k, v, cu_q, cu_k, backend=backend, causal=True, return_lse=True)
    _, ref = reference_attention_varlen(q, k, v, cu_q, cu_k, causal=True)
    assert lse.shape == (2, 19) and lse.dtype == torch.float32
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref)), "rows that see no key have lse = -inf"
    live = torch.isfinite(ref)
    torch.testing.assert_close(lse[live].double(), ref[live], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_sequences_nan_stays_in_that_sequence(backend):
    """NaN in the V of a sequence's first keys reaches only that sequence's rows, not the previous one's, whose last
    key block the next keys share (masked) on the general kernels. (The Hopper kernels read them with weight 0, so a
    non-finite V there does reach the previous sequence: docs/errors.md.)"""
    q, k, v, cu_q, cu_k = make_varlen_inputs([37, 50], [37, 50], 2, 2, 16)
    v[37:40] = float("nan")
    out = M.attention_varlen(q, k, v, cu_q, cu_k, backend=backend, causal=True)
    assert out[:37].isfinite().all() and out[37:].isnan().any(-1).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("side", ["right", "left"])
def test_varlen_equals_padded_attention_on_live_rows(backend, side):
    """unpad -> attention_varlen -> pad gives what attention() with the key padding mask gives on every
    live query (ALiBi's causal form included: it differs by a per-row constant only)."""
    gen = torch.Generator().manual_seed(1)
    batch, seq, n_heads, head_dim = 3, 41, 4, 16
    x = torch.randn(batch, seq, 3, n_heads, head_dim, generator=gen)
    q, k, v = x.unbind(2)
    lengths = torch.tensor([41, 17, 30])
    keep = torch.arange(seq).view(1, seq) < lengths.view(batch, 1)
    keep = keep.flip(1) if side == "left" else keep
    slopes = M.gen_slopes(n_heads, return_1d=True)
    dense = M.attention(q, k, v, backend=backend, causal=True, alibi_slopes=slopes, key_padding_mask=keep)
    (qp, kp, vp), (indices, cu, max_len) = [unpad(t, keep)[0] for t in (q, k, v)], unpad(q, keep)[1:]
    packed = M.attention_varlen(qp, kp, vp, cu, cu, max_len, max_len, backend=backend, causal=True,
                                alibi_slopes=slopes)
    out = pad(packed, indices, batch, seq)
    torch.testing.assert_close(out[keep], dense[keep], rtol=1e-5, atol=2e-6)
    assert (out[~keep] == 0).all()


def test_triton_varlen_dropout_applies_exactly_the_kernels_mask():
    lens_q, lens_k, p = [9, 14], [9, 20], 0.25
    q, k, v, cu_q, cu_k = make_varlen_inputs(lens_q, lens_k, 2, 1, 16, requires_grad=True)
    torch.manual_seed(7)
    seed = torch.randint(0, 2**62, (1,), dtype=torch.int64)
    torch.manual_seed(7)
    out = M.attention_varlen(q, k, v, cu_q, cu_k, backend="triton", causal=True, dropout_p=p)
    # the counters are laid out as a dense (B, H, max_q, max_k) problem; each sequence takes its corner
    keep = ops.triton_dropout_mask(2, 2, max(lens_q), max(lens_k), seed, p)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    inputs64 = [x.detach().double().requires_grad_() for x in (q, k, v)]
    refs = []
    for b in range(2):
        qs, ks = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        mask = keep[b:b + 1, :, :lens_q[b], :lens_k[b]]
        refs.append(reference_attention(inputs64[0][qs][None], inputs64[1][ks][None], inputs64[2][ks][None],
                                        causal=True, dropout_mask=mask, dropout_p=p)[0][0])
    ref = torch.cat(refs)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, torch.autograd.grad(ref, inputs64, dout.double())):
        torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-5)


def test_varlen_compiles_fullgraph_on_triton():
    q, k, v, cu_q, cu_k = make_varlen_inputs([13, 6], [13, 6], 2, 2, 16, requires_grad=True)

    def step(q, k, v):
        out, lse = M.attention_varlen(q, k, v, cu_q, cu_k, 13, 13, backend="triton", causal=True, return_lse=True)
        return out * 2.0, lse

    assert_compiled_matches_eager(step, [q, k, v])


BAD_VARLEN = [
    ("4d-q", dict(q=torch.randn(1, 10, 2, 8)), ValueError,
     r"q must be a 3-D packed tensor \(T, H, D\), got \(1, 10, 2, 8\)"),
    ("int64-cu", dict(cu_seqlens_q=torch.tensor([0, 4, 10])), ValueError,
     r"cu_seqlens_q must be int32 \(B \+ 1,\) cumulative lengths, got torch.int64 \(3,\)"),
    ("cu-not-from-0", dict(cu_seqlens_k=_cu([4, 6]) + 1), ValueError,
     r"cu_seqlens_k must start at 0, never decrease and end at the packed length 10, got \[1, 5, 11\]"),
    ("cu-decreasing", dict(cu_seqlens_q=torch.tensor([0, 11, 10], dtype=torch.int32)), ValueError,
     r"cu_seqlens_q must start at 0, never decrease"),
    ("cu-wrong-total", dict(cu_seqlens_q=_cu([4, 5])), ValueError, r"end at the packed length 10, got \[0, 4, 9\]"),
    ("cu-count", dict(cu_seqlens_k=_cu([4, 3, 3])), ValueError, r"the same number of sequences, got 2 and 3"),
    ("max-too-small", dict(max_seqlen_q=5), ValueError, r"max_seqlen_q=5 is shorter than the longest sequence \(6\)"),
    ("slopes-shape", dict(alibi_slopes=torch.ones(3, 2)), ValueError,
     r"alibi_slopes must be \(H_q,\)=\(2,\) or \(B, H_q\)=\(2, 2\)"),
    ("heads", dict(k=torch.randn(10, 3, 8), v=torch.randn(10, 3, 8)), ValueError,
     r"H_q=2 must be a multiple of key/value heads H_kv=3"),
    ("dtype", dict(k=torch.randn(10, 1, 8).half()), TypeError, r"must share one floating dtype"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("override,exc,message", [pytest.param(*c[1:], id=c[0]) for c in BAD_VARLEN])
def test_bad_varlen_inputs(backend, override, exc, message):
    args = dict(q=torch.randn(10, 2, 8), k=torch.randn(10, 1, 8), v=torch.randn(10, 1, 8),
                cu_seqlens_q=_cu([4, 6]), cu_seqlens_k=_cu([4, 6]))
    args.update(override)
    with pytest.raises(exc, match=message):
        M.attention_varlen(args.pop("q"), args.pop("k"), args.pop("v"), args.pop("cu_seqlens_q"),
                           args.pop("cu_seqlens_k"), backend=backend, **args)


def test_error_table_in_docs_lists_every_varlen_message():
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "errors.md").read_text()
    for phrase in ["must be a 3-D packed tensor (T, H, D)", "must be int32 (B + 1,) cumulative lengths",
                   "never decrease and end at the packed length", "must describe the same number of sequences",
                   "is shorter than the longest sequence", "(B = number of sequences)",
                   "under torch.compile needs max_seqlen_q and max_seqlen_k"]:
        assert phrase in doc, f"docs/errors.md misses {phrase!r}"


def test_unpad_rejects_a_non_bool_mask():
    with pytest.raises(ValueError, match=r"keep must be bool \(B, S\)=\(2, 3\), got torch.int64"):
        unpad(torch.randn(2, 3, 4), torch.ones(2, 3, dtype=torch.long))
    from mpt_attention.padding import cu_seqlens_from_sequence_id

    with pytest.raises(ValueError, match=r"sequence_id must be an integer \(B, S\) tensor, got torch.float32 \(6,\)"):
        cu_seqlens_from_sequence_id(torch.zeros(6))


def _key_block_range_probe():
    import triton
    import triton.language as tl

    from mpt_attention.impl.triton.common import key_block_range

    @triton.jit
    def probe(Out, seqlen_q, seqlen_k, IS_CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        start_m = tl.program_id(0) * BLOCK_M
        zero = tl.zeros([], dtype=tl.int64)
        lo, lo_masked, hi = key_block_range(start_m, zero, Out, Out, seqlen_q, seqlen_k,
                                            IS_CAUSAL, False, False, False, BLOCK_M, BLOCK_N)
        tl.store(Out + tl.program_id(0) * 3, lo)
        tl.store(Out + tl.program_id(0) * 3 + 1, lo_masked)
        tl.store(Out + tl.program_id(0) * 3 + 2, hi)

    probe.fn.__globals__["key_block_range"] = key_block_range  # defined here to keep triton out of import time
    return probe


def test_key_block_range_is_empty_for_tiles_past_a_sequence_end():
    """Under varlen the grid covers the longest sequence; a shorter one's surplus query tiles must visit
    no key block at all (a tile that ran its unmasked loop anyway cost the first varlen benchmark 3x)."""
    probe = _key_block_range_probe()
    for causal in (True, False):
        for s_q, s_k in ((37, 37), (5, 40), (40, 5), (0, 9)):
            tiles = 4  # the grid of a 128-long sequence with 32-row tiles
            out = torch.full((tiles * 3,), -1, dtype=torch.int32)
            probe[(tiles,)](out, s_q, s_k, IS_CAUSAL=causal, BLOCK_M=32, BLOCK_N=32)
            for t, (lo, lo_masked, hi) in enumerate(out.view(tiles, 3).tolist()):
                assert 0 <= lo <= lo_masked <= hi <= s_k, (causal, s_q, s_k, t, lo, lo_masked, hi)
                if t * 32 >= s_q:
                    assert lo == lo_masked == hi, f"tile {t} past S_q={s_q} visits keys [{lo}, {hi})"


def test_length_checks_are_cached_until_the_lengths_change():
    q, k, v, cu_q, cu_k = make_varlen_inputs([5, 6], [5, 6], 2, 2, 8)
    M.attention_varlen(q, k, v, cu_q, cu_k, backend="torch")
    assert kept_values(cu_q, "_mpt_attention_length_stats") == [(0, 11, 5, 6)]
    cu_q[1] = 12  # in place: the cached check no longer holds and must not be trusted
    with pytest.raises(ValueError, match=r"cu_seqlens_q must start at 0, never decrease"):
        M.attention_varlen(q, k, v, cu_q, cu_k, backend="torch")


@pytest.mark.parametrize("backend", BACKENDS)
def test_varlen_takes_strided_cu_seqlens(backend):
    """cu_seqlens as a strided view (every other entry of a longer tensor) means what its values say."""
    q, k, v, cu_q, cu_k = make_varlen_inputs([5, 0, 6], [7, 2, 6], 2, 1, 8, requires_grad=True)
    spread = [torch.stack([cu, cu]).t().reshape(-1)[::2] for cu in (cu_q, cu_k)]
    assert not spread[0].is_contiguous() and torch.equal(spread[0], cu_q)
    outs = [M.attention_varlen(q, k, v, *cus, backend=backend, causal=True) for cus in ((cu_q, cu_k), spread)]
    dout = torch.randn_like(outs[0])
    grads = [torch.autograd.grad(o, [q, k, v], dout) for o in outs]
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_varlen_under_inference_mode(backend):
    """Serving runs under torch.inference_mode, whose tensors have no version counter to key the length
    check's cache on: the check runs every call there, and a bad length is still refused."""
    with torch.inference_mode():
        q, k, v, cu_q, cu_k = make_varlen_inputs([5, 6], [5, 6], 2, 2, 8)
        out = M.attention_varlen(q, k, v, cu_q, cu_k, backend=backend, causal=True)
        ref = M.attention_varlen(q, k, v, cu_q, cu_k, backend="torch", causal=True)
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
        cu_q[1] = 12
        with pytest.raises(ValueError, match=r"cu_seqlens_q must start at 0, never decrease"):
            M.attention_varlen(q, k, v, cu_q, cu_k, backend=backend)


def test_varlen_under_compile_needs_the_max_lengths():
    torch._dynamo.reset()
    q, k, v, cu_q, cu_k = make_varlen_inputs([3, 4], [3, 4], 2, 2, 8)
    step = torch.compile(lambda q: M.attention_varlen(q, k, v, cu_q, cu_k, backend="torch"), fullgraph=True,
                         backend="eager")
    with pytest.raises(Exception, match="needs max_seqlen_q and max_seqlen_k"):
        step(q)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_packed_sequence_ids_as_varlen(backend, causal):
    """MPT's packed rows (sequence_id) through attention_varlen equal attention(..., sequence_id=...)."""
    from mpt_attention.padding import cu_seqlens_from_sequence_id

    gen = torch.Generator().manual_seed(5)
    batch, seq, n_heads, n_kv, head_dim = 2, 45, 4, 2, 16
    q = torch.randn(batch, seq, n_heads, head_dim, generator=gen)
    k, v = (torch.randn(batch, seq, n_kv, head_dim, generator=gen) for _ in range(2))
    ids = torch.tensor([[0] * 10 + [1] * 30 + [2] * 5, [4] * 45])
    slopes = M.gen_slopes(n_heads, return_1d=True)
    expected = M.attention(q, k, v, backend=backend, causal=causal, alibi_slopes=slopes, sequence_id=ids)
    cu, max_len = cu_seqlens_from_sequence_id(ids)
    assert cu.tolist() == [0, 10, 40, 45, 90] and max_len == 45
    flat = [t.flatten(0, 1) for t in (q, k, v)]
    out = M.attention_varlen(*flat, cu, cu, max_len, max_len, backend=backend, causal=causal, alibi_slopes=slopes)
    torch.testing.assert_close(out.view_as(q), expected, rtol=1e-5, atol=2e-6)
