"""Which inputs the Hopper forward kernel takes (impl/triton/hopper.py), checked without a GPU: every
reason but the last ("not an sm_90 GPU") is decided from shapes, dtypes and strides alone. The kernel
itself runs in tests/test_gpu_hopper.py and compiles for sm_90 in tests/test_kernels_compile.py."""

import pytest
import torch

pytest.importorskip("triton")
from mpt_attention.impl.triton import hopper, hopper_dkdv, hopper_views, launch, plans  # noqa: E402


def _qkv(s_q=128, s_k=128, d=128, dtype=torch.bfloat16, h=4, h_kv=2):
    return (torch.randn(2, s_q, h, d, dtype=dtype), torch.randn(2, s_k, h_kv, d, dtype=dtype),
            torch.randn(2, s_k, h_kv, d, dtype=dtype))


def _why(q, k, v, bias=None, kpm=None, dropout_p=0.0, causal=True, varlen=False, dout=None, max_q=0):
    return hopper.unsupported(q, k, v, bias, kpm, None, None, dropout_p, causal, varlen, dout, max_q=max_q)


def _packed(total_q=1000, total_k=1200, d=128):
    """Packed (T, H, D) sequences, as attention_varlen passes them."""
    return (torch.randn(total_q, 4, d, dtype=torch.bfloat16), torch.randn(total_k, 2, d, dtype=torch.bfloat16),
            torch.randn(total_k, 2, d, dtype=torch.bfloat16))


def test_gluon_kernel_imports_with_this_triton():
    assert hopper._IMPORT_ERROR is None


def test_an_eligible_input_is_refused_only_for_the_device():
    assert _why(*_qkv()) == "not an sm_90 GPU"
    assert _why(*_qkv(d=64, dtype=torch.float16), causal=False) == "not an sm_90 GPU"
    qkv = torch.randn(2, 200, 3 * 4 * 128, dtype=torch.bfloat16)  # the seed's packed projection: heads adjacent
    assert _why(*(t.unflatten(-1, (4, 128)) for t in qkv.chunk(3, dim=-1))) == "not an sm_90 GPU"
    # SDPA's (B, H, S, D) tensors seen as (B, S, H, D): the copy engine takes any aligned strides
    assert _why(*(t.transpose(1, 2).contiguous().transpose(1, 2) for t in _qkv())) == "not an sm_90 GPU"
    # packed sequences in the forward, the longest at least one tile of queries (causal or not: a packed tile
    # whose rows see no key runs a fully masked block)
    assert _why(*_packed(), varlen=True, max_q=700) == "not an sm_90 GPU"
    assert _why(*_packed(d=80), varlen=True, max_q=128, causal=False) == "not an sm_90 GPU"
    # and in the backward with the dQ sums (the default, deterministic=None)
    q, k, v = _packed()
    assert hopper.unsupported(q, k, v, None, None, None, None, 0.0, True, True, torch.randn_like(q), fused_dq=True,
                              max_q=700) == "not an sm_90 GPU"


@pytest.mark.parametrize("head_dim, width", [(64, 64), (72, 128), (80, 128), (96, 128), (104, 128), (112, 128),
                                             (120, 128), (128, 128), (16, None), (48, None), (136, None), (256, None)])
def test_head_dims_between_64_and_128_run_in_tiles_of_128(head_dim, width):
    """D 72-120 (MPT-30B's 112) run on the Hopper kernels in tiles of 128 columns, the copy engine reading
    the columns past D as zeros and dropping them on stores; D below 64 or above 128 take the general ones.
    The forward's Q K^T contracts D rounded up to 16: where the output has a tail, exactly its pieces' columns."""
    from mpt_attention.impl.triton.hopper_scores import contracted_cols

    assert hopper.tile_dim(head_dim) == width
    tail = hopper.product_tail(head_dim)
    assert tail == {72: 16, 80: 16, 96: 32}.get(head_dim, 0)
    if width:
        assert hopper.qk_cols(head_dim) == {64: 64, 72: 80, 80: 80, 96: 96, 104: 112, 112: 112}.get(head_dim, 128)
        if tail:  # the launcher's QK_COLS leaves D 72-96's products as their tail makes them
            assert contracted_cols(width, tail, 0) == hopper.qk_cols(head_dim)
    expected = "not an sm_90 GPU" if width else f"head dim {head_dim}"
    assert _why(*_qkv(d=head_dim)) == expected
    q, k, v = _qkv(d=head_dim)
    fused = hopper.unsupported(q, k, v, None, None, None, None, 0.0, True, False, torch.randn_like(q), fused_dq=True)
    assert fused == expected


@pytest.mark.parametrize("ptxas, tails", [
    pytest.param("12.8", {64: 0, 72: 16, 80: 16, 88: 32, 96: 32, 112: 0, 128: 0}, id="ptxas12-pieces"),
    pytest.param("13.4", {64: 0, 72: 0, 80: 0, 88: 0, 96: 0, 112: 0, 128: 0}, id="ptxas13-whole-tile"),
    pytest.param("", {80: 16, 96: 32}, id="ptxas-unknown-pieces"),
])
def test_forward_pv_spans_the_whole_tile_where_sm90_ptxas_is_cuda13(monkeypatch, ptxas, tails):
    """ptxas 13 keeps the copies Triton >= 3.8 makes of P for the second piece's P V product (D96: 32 moves per key
    block), so there the forward's P V spans the tile; Q K^T contracts D rounded up to 16 either way."""
    from mpt_attention.impl.device import release
    from mpt_attention.impl.triton import lean_launch

    monkeypatch.setattr(lean_launch, "sm90_ptxas_release", lambda: release(ptxas))
    hopper._ptxas13_on_hopper.cache_clear()
    try:
        assert {d: hopper.forward_tail(d) for d in tails} == tails
    finally:
        hopper._ptxas13_on_hopper.cache_clear()


@pytest.mark.parametrize("head_dim, bias_matrix, fused_dq, block_m", [
    pytest.param(64, False, True, 64, id="D64"),
    pytest.param(64, True, False, 64, id="D64-bias-matrix-split"),
    pytest.param(128, False, True, 64, id="D128-consumers-form-dQ"),
    pytest.param(112, False, True, 64, id="D112-consumers-form-dQ"),
    pytest.param(128, True, True, 32, id="D128-bias-matrix-dQ-warpgroup"),
    pytest.param(80, True, True, 32, id="D80-bias-matrix-dQ-warpgroup"),
    pytest.param(80, False, True, 64, id="D80-product-tail-consumers-form-dQ"),
    pytest.param(96, False, True, 64, id="D96-product-tail-consumers-form-dQ"),
    pytest.param(128, False, False, 32, id="D128-split-dQ-kernel"),
])
def test_backward_queries_per_step(head_dim, bias_matrix, fused_dq, block_m):
    """64 queries per step of the dK/dV kernel at tile width 128 only where its consumers form dQ (the dQ sums,
    no bias matrix: hopper_dq.consumers_dq); 32 beside the dQ warpgroup or the split dQ kernel."""
    assert hopper_dkdv.bwd_block_m(hopper.tile_dim(head_dim), bias_matrix, fused_dq) == block_m


@pytest.mark.parametrize("what, expected", [
    ("float32", "dtype torch.float32"),
    ("head-dim-136", "head dim 136"),
    ("bias-matrix-float32", "bias matrix of dtype torch.float32 (the Hopper kernels read one in q's dtype, "
                            "torch.bfloat16)"),
    ("bias-float64", "bias dtype torch.float64"),
    ("key-padding", "masks or dropout"),
    ("dropout", "masks or dropout"),
    ("varlen-reproducible-backward", "packed sequences in the reproducible backward"),
    ("varlen-short", "fewer than 128 query rows"),
    ("varlen-no-keys", "no rows, keys or query heads"),
    ("causal-more-queries-than-keys", "rows without keys"),
    ("no-keys", "rows without keys"),
    ("empty-batch", "no batch rows or no query heads"),
    ("no-query-heads", "no batch rows or no query heads"),
    ("decode", "fewer than 128 query rows"),
    ("misaligned", "strides not 16-byte aligned"),
    ("kv-expanded-over-heads", "a dim expanded with stride 0"),
])
def test_reasons(what, expected):
    q, k, v = _qkv(dtype=torch.float32 if what == "float32" else torch.bfloat16,
                   d=136 if what == "head-dim-136" else 128)
    kw = {}
    if what == "bias-matrix-float32":
        kw["bias"] = torch.randn(1, 4, 128, 128)
    elif what == "bias-float64":
        kw["bias"] = torch.randn(1, 4, 1, 128, dtype=torch.float64)
    elif what == "key-padding":
        kw["kpm"] = torch.ones(2, 128, dtype=torch.bool)
    elif what == "dropout":
        kw["dropout_p"] = 0.1
    elif what == "varlen-reproducible-backward":
        q, k, v = _packed()
        kw.update(varlen=True, max_q=700, dout=torch.randn_like(q))
    elif what == "varlen-short":
        q, k, v = _packed()
        kw.update(varlen=True, max_q=127)
    elif what == "varlen-no-keys":
        q, k, v = _packed(total_k=0)
        kw.update(varlen=True, max_q=700)
    elif what == "causal-more-queries-than-keys":
        q, k, v = _qkv(s_q=200, s_k=100)
    elif what == "no-keys":
        q, k, v = _qkv(s_k=0)
    elif what == "empty-batch":
        q, k, v = (t[:0] for t in _qkv(s_q=256, s_k=256))
    elif what == "no-query-heads":
        q = q[:, :, :0]
    elif what == "decode":
        q, k, v = _qkv(s_q=1, s_k=4097)
    elif what == "misaligned":
        q = torch.randn(2, 128, 4, 129, dtype=torch.bfloat16)[..., 1:]
    elif what == "kv-expanded-over-heads":
        k, v = (t[:, :, :1].expand(-1, -1, 2, -1) for t in (k, v))
    assert _why(q, k, v, **kw) == expected


@pytest.mark.parametrize("bias", [
    pytest.param(torch.randn(1, 4, 1, 128), id="mpt-vector-fp32"),
    pytest.param(torch.randn(2, 1, 1, 128, dtype=torch.bfloat16), id="per-batch-bf16"),
    pytest.param(torch.randn(1, 4, 1, 128).expand(2, 4, 1, 128), id="expanded-over-batch"),
    pytest.param(torch.randn(1, 4, 1, 136)[..., 8:], id="sliced-keeping-alignment"),
])
def test_bias_rows_over_the_keys_are_taken(bias):
    assert _why(*_qkv(), bias=bias) == "not an sm_90 GPU"
    shape, strides, b_on, h_on = hopper_views.bias_row_view(bias)
    assert shape[2] == 128 and strides[2] == 1
    assert (shape[0], b_on) == ((2, 1) if bias.shape[0] == 2 and bias.stride(0) else (1, 0))
    assert (shape[1], h_on) == ((4, 1) if bias.shape[1] == 4 else (1, 0))


@pytest.mark.parametrize("bias", [
    pytest.param(torch.randn(1, 4, 1, 131)[..., 3:], id="base-12-bytes-off"),
    pytest.param(torch.randn(2, 4, 1, 129, dtype=torch.bfloat16)[..., 1:], id="bf16-odd-row-stride"),
    pytest.param(torch.randn(1, 4, 1, 256)[..., ::2], id="strided-keys"),
    pytest.param(torch.randn(1, 1, 1, 129)[..., 1:].expand(2, 4, 1, 128), id="expanded-unaligned"),
    pytest.param(torch.randn(2, 4, 1, 128, dtype=torch.float16), id="aligned-fp16"),
    pytest.param(torch.randn(1, 4, 1, 100), id="aligned-fp32"),
])
def test_bias_rows_reach_the_kernels_converted_and_aligned(bias):
    """Every bias row, the copy engine's layout or not, reaches the kernels as float32 log2 units in
    16-byte aligned rows (launch._log2_bias_rows), broadcast dims kept at size 1; -inf stays -inf and
    values below the soft-mask threshold become the one soft-mask score (common.SOFT_SCORE)."""
    if bias.is_contiguous():  # plant -inf, the dtype's min and a -1e9 mask
        bias = bias.clone()
        large = -1e9 if bias.dtype == torch.float32 else -6e4
        bias[0, 0, 0, :3] = torch.tensor([float("-inf"), torch.finfo(bias.dtype).min, large])
    rows = launch._log2_bias_rows(bias)
    assert rows.dtype == torch.float32 and rows.shape[2:] == bias.shape[2:]
    assert hopper_views.bias_row_view(rows) is not None
    expected = bias.float() * 1.4426950408889634
    soft = (expected < -2.0**20) & (bias != float("-inf"))
    expected = torch.where(soft, -(2.0**100), expected)
    torch.testing.assert_close(rows.expand(bias.shape), expected, rtol=1e-6, atol=0)


def test_backward_also_needs_an_eligible_output_gradient():
    q, k, v = _qkv()
    dout = torch.randn_like(q)
    assert hopper.unsupported(q, k, v, None, None, None, None, 0.0, True, False, dout) == "not an sm_90 GPU"
    misaligned = torch.randn(2, 128, 4, 129, dtype=torch.bfloat16)[..., 1:]
    why = hopper.unsupported(q, k, v, None, None, None, None, 0.0, True, False, misaligned)
    assert why == "strides not 16-byte aligned"
    q64, k64, v64 = _qkv(d=64)
    why = hopper.unsupported(q64, k64, v64, None, None, None, None, 0.0, True, False, torch.randn_like(q64))
    assert why.startswith("head dim 64 in the backward")
    bias = torch.randn(1, 4, 1, 128)  # a bias row without its gradient: the Hopper dK/dV kernel reads it too
    assert hopper.unsupported(q, k, v, bias, None, None, None, 0.0, True, False, dout) == "not an sm_90 GPU"


def _fused_why(bias, s_q=128, s_k=128):
    q, k, v = _qkv(s_q=s_q, s_k=s_k)
    return hopper.unsupported(q, k, v, bias, None, None, None, 0.0, True, False, torch.randn_like(q), fused_dq=True)


@pytest.mark.parametrize("bias, rows, mults", [
    pytest.param(torch.randn(2, 4, 128, 128, dtype=torch.bfloat16), 8, (4, 1), id="full-shape"),
    pytest.param(torch.randn(1, 4, 128, 128, dtype=torch.bfloat16), 4, (0, 1), id="broadcast-over-batch"),
    pytest.param(torch.randn(2, 1, 128, 128, dtype=torch.bfloat16), 2, (1, 0), id="broadcast-over-heads"),
    pytest.param(torch.randn(1, 1, 128, 128, dtype=torch.bfloat16).expand(2, 4, 128, 128), 1, (0, 0),
                 id="expanded-from-one-matrix"),
    pytest.param(torch.randn(2, 4, 128, 136, dtype=torch.bfloat16)[..., :128], 8, (4, 1), id="padded-rows"),
])
def test_the_backward_with_the_dq_warpgroup_takes_a_bias_matrix(bias, rows, mults):
    """A bias matrix in q's dtype reaches the Hopper dK/dV kernel with the dQ warpgroup as a (B' * H', S_q, S_k)
    copy-engine view, (b, h) at row b * b_mult + h * h_mult."""
    assert _fused_why(bias) == "not an sm_90 GPU"
    shape, strides, b_mult, h_mult = hopper_views.bias_matrix_view(bias)
    assert shape == [rows, 128, 128] and strides[1:] == [bias.stride(2), 1] and (b_mult, h_mult) == mults
    for b, h in [(0, 0), (1, 3), (1, 0)]:  # each (batch, head) row's first element sits where the view says
        assert (b * b_mult + h * h_mult) * strides[0] == (b * bias.stride(0) if bias.shape[0] > 1 else 0) + (
            h * bias.stride(1) if bias.shape[1] > 1 else 0)


_NO_VIEW = "bias matrix strides: not a (B' * H', S_q, S_k) view with 16-byte aligned rows"


@pytest.mark.parametrize("bias, expected", [
    pytest.param(torch.randn(2, 4, 128, 128), "bias matrix of dtype torch.float32 (the Hopper kernels read one in "
                 "q's dtype, torch.bfloat16)", id="float32"),
    pytest.param(torch.randn(2, 4, 128, 129, dtype=torch.bfloat16)[..., 1:], _NO_VIEW, id="odd-row-stride"),
    pytest.param(torch.randn(4, 2, 128, 128, dtype=torch.bfloat16).transpose(0, 1), _NO_VIEW,
                 id="batch-and-heads-not-one-axis"),
    pytest.param(torch.randn(2, 4, 1, 128, dtype=torch.bfloat16).expand(2, 4, 128, 128), _NO_VIEW,
                 id="row-expanded-over-queries"),
    pytest.param(torch.randn(2, 4, 128, 1, dtype=torch.bfloat16), "bias of shape (2, 4, 128, 1): a matrix must span "
                 "(S_q, S_k) = (128, 128)", id="broadcast-over-keys"),
])
def test_bias_matrices_the_hopper_kernels_cannot_read(bias, expected):
    assert _fused_why(bias) == expected
    # the forward reads matrices by the same rules; a backward without the dQ warpgroup reads none
    for d in (64, 112, 128):
        assert _why(*_qkv(d=d), bias=bias) == expected
    q, k, v = _qkv()
    assert hopper.unsupported(q, k, v, bias, None, None, None, 0.0, True, False, torch.randn_like(q)).startswith(
        f"bias of shape {tuple(bias.shape)}: only rows")


@pytest.mark.parametrize("bias", [
    pytest.param(torch.randn(2, 4, 128, 128, dtype=torch.bfloat16), id="full-shape"),
    pytest.param(torch.randn(1, 4, 128, 128, dtype=torch.bfloat16), id="broadcast-over-batch"),
    pytest.param(torch.randn(2, 1, 128, 128, dtype=torch.bfloat16), id="broadcast-over-heads"),
    pytest.param(torch.randn(2, 4, 128, 136, dtype=torch.bfloat16)[..., :128], id="padded-rows"),
])
@pytest.mark.parametrize("head_dim", [64, 80, 112, 128])
def test_the_forward_takes_a_bias_matrix(bias, head_dim):
    """The Hopper forward reads a bias matrix in q's dtype, its tiles riding with K (at tile width 128 with one
    Q buffer per program instead of two, for the shared memory)."""
    assert _why(*_qkv(d=head_dim), bias=bias) == "not an sm_90 GPU"
    assert _why(*_qkv(d=head_dim), bias=bias, causal=False) == "not an sm_90 GPU"


def test_disabled_switch(monkeypatch):
    monkeypatch.setattr(hopper, "ENABLED", False)
    assert _why(*_qkv()) == "disabled"


@pytest.mark.parametrize("s_k, d, h, h_kv, n_bh, expected", [
    pytest.param(8192, 128, 16, 16, 32, 6, id="S8192-D128-MHA: 4 MB of K and V per head"),
    pytest.param(8192, 128, 32, 4, 64, 48, id="GQA-32-4: eight query heads share each K and V"),
    pytest.param(2048, 128, 16, 16, 128, 24, id="S2048: 1 MB per head"),
    pytest.param(128, 64, 4, 4, 8, 8, id="short: every head in one group"),
    pytest.param(262144, 128, 1, 1, 1, 1, id="longer than the budget: one head"),
])
def test_forward_head_groups_keep_k_and_v_within_the_l2_budget(s_k, d, h, h_kv, n_bh, expected):
    k = torch.empty(1, s_k, h_kv, d, dtype=torch.bfloat16, device="meta")
    assert hopper.heads_per_group(k, h, n_bh) == expected


@pytest.mark.parametrize("s_q, d, n_rows, heads_per_row, fused_dq, expected", [
    pytest.param(8192, 128, 32, 1, True, 3, id="S8192-D128: 8 MB of Q, dO and dQ sums per head"),
    pytest.param(2048, 128, 128, 1, True, 12, id="S2048: 2 MB per head"),
    pytest.param(16384, 128, 16, 1, True, 1, id="S16k: 16 MB per head, row after row"),
    pytest.param(8192, 128, 16, 2, True, 1, id="GQA, two query heads per row: 16 MB, row after row"),
    pytest.param(128, 64, 5, 1, True, 5, id="short: every row in one group"),
    pytest.param(2048, 128, 128, 1, False, 1, id="the reproducible split: row after row"),
])
def test_backward_row_groups_keep_what_their_programs_share_within_the_l2_budget(s_q, d, n_rows, heads_per_row,
                                                                                   fused_dq, expected):
    q = torch.empty(1, s_q, heads_per_row, d, dtype=torch.bfloat16, device="meta")
    assert hopper_dkdv.bwd_rows_per_group(q, n_rows, heads_per_row, fused_dq) == expected


@pytest.mark.parametrize("soft_rows", [False, True], ids=["no-bias", "bias-may-soft-mask-rows"])
def test_row_terms_for_the_hopper_backward(soft_rows):
    """The delta kernel's copy of the per-query terms the Hopper dK/dV kernel's loader brings beside Q and dO
    (``hopper_dkdv.row_stats_buffer``): the LSE as a log2-domain offset (+inf for a row that saw no key, the soft
    score for a soft-masked one) and delta, in rows padded to the kernel's 64-query steps with +inf and 0, so a
    step's rows past S_q get P = 0 without a select in the kernel."""
    from mpt_attention.impl.triton import common

    batch, s_q, heads, dim = 2, 37, 3, 16
    out, dout = torch.randn(batch, s_q, heads, dim), torch.randn(batch, s_q, heads, dim)
    lse, dlse = torch.randn(batch, heads, s_q), torch.randn(batch, heads, s_q)
    lse[0, 1, 5] = float("-inf")
    lse[1, 2, 36] = common.SOFT_LSE.value - 3 * common.SOFT_COUNT_UNIT.value  # soft-masked, 3 keys
    delta = torch.full_like(lse, float("nan"))
    row_stats = hopper_dkdv.row_stats_buffer(batch, heads, s_q, "cpu").fill_(float("nan"))
    assert row_stats.shape == (batch * heads, 2, 64)
    dout_scaled = torch.full_like(dout, float("nan")) if soft_rows else None
    plans.row_terms(out, dout, lse, dlse, delta, dout_scaled, row_stats)

    scale = torch.ones_like(lse)
    lse2 = lse * 1.4426950408889634
    lse2[0, 1, 5] = float("inf")
    if soft_rows:
        scale[1, 2, 36] = 1 / 3
        lse2[1, 2, 36] = common.SOFT_SCORE.value
    want_delta = ((out * dout).sum(-1).transpose(1, 2) - dlse) * scale
    torch.testing.assert_close(delta, want_delta)
    torch.testing.assert_close(row_stats[:, 0, :s_q], lse2.reshape(batch * heads, s_q), atol=0, rtol=1e-6)
    torch.testing.assert_close(row_stats[:, 1, :s_q], want_delta.reshape(batch * heads, s_q))
    assert (row_stats[:, 0, s_q:] == float("inf")).all() and (row_stats[:, 1, s_q:] == 0).all()
    if soft_rows:
        torch.testing.assert_close(dout_scaled, dout * scale.transpose(1, 2)[..., None])


def test_row_terms_scale_only_the_blocks_holding_a_soft_masked_row():
    """With ``soft_blocks`` (the fused Hopper backward with a bias) the delta kernel writes dO scaled only in the
    64-query blocks that hold a soft-masked row, and one word per (batch, head, block) saying which: the dK/dV
    kernel's loader reads those blocks from the copy and every other block from dO itself (no copy of dO for a bias
    that soft-masks no whole row, as MPT's ALiBi row)."""
    from mpt_attention.impl.triton import common

    batch, s_q, heads, dim = 2, 150, 3, 16  # blocks of 64: 0-63, 64-127, 128-149
    out, dout = torch.randn(batch, s_q, heads, dim), torch.randn(batch, s_q, heads, dim)
    lse = torch.randn(batch, heads, s_q)
    lse[0, 1, 70] = common.SOFT_LSE.value - 3 * common.SOFT_COUNT_UNIT.value  # soft-masked, 3 keys
    lse[1, 2, 149] = common.SOFT_LSE.value - 5 * common.SOFT_COUNT_UNIT.value  # in the last, partial block
    lse[1, 0, 3] = float("-inf")  # a row that saw no key is not soft-masked
    row_stats = hopper_dkdv.row_stats_buffer(batch, heads, s_q, "cpu").fill_(float("nan"))
    dout_scaled = torch.full_like(dout, float("nan"))
    soft_blocks = plans.soft_blocks_buffer(batch, heads, s_q, "cpu").fill_(-1)
    assert soft_blocks.shape == (batch * heads * 3,)
    plans.row_terms(out, dout, lse, None, None, dout_scaled, row_stats, soft_blocks=soft_blocks)

    want_words = torch.zeros(batch, heads, 3, dtype=torch.int32)
    want_words[0, 1, 1] = want_words[1, 2, 2] = 1
    assert torch.equal(soft_blocks.view(batch, heads, 3), want_words)
    scale = torch.ones_like(lse)
    scale[0, 1, 70], scale[1, 2, 149] = 1 / 3, 1 / 5
    want = dout * scale.transpose(1, 2)[..., None]
    torch.testing.assert_close(dout_scaled[0, 64:128, 1], want[0, 64:128, 1])  # the whole block, scaled where soft
    torch.testing.assert_close(dout_scaled[1, 128:, 2], want[1, 128:, 2])
    written = torch.zeros(batch, s_q, heads, dtype=torch.bool)
    written[0, 64:128, 1] = written[1, 128:, 2] = True
    assert dout_scaled[~written].isnan().all()  # no other block is copied
    want_delta = (out * dout).sum(-1).transpose(1, 2) * scale
    torch.testing.assert_close(row_stats[:, 1, :s_q], want_delta.reshape(batch * heads, s_q))


def test_packed_sequences_count_their_query_tiles_on_the_device():
    """hopper_tiles.forward_tile finds a tile's sequence in these cumulative counts of 128-row tiles (an empty
    sequence holds none)."""
    cu_q = torch.tensor([0, 0, 1, 130, 130, 386], dtype=torch.int32)  # lengths 0, 1, 129, 0, 256
    tiles = hopper.packed_tiles(cu_q)
    assert tiles.dtype == torch.int32 and tiles.tolist() == [0, 0, 1, 3, 3, 5]
    cu_q.copy_(torch.tensor([0, 128, 128, 129, 129, 129], dtype=torch.int32))  # kept on cu_q until it changes
    assert hopper.packed_tiles(cu_q).tolist() == [0, 1, 1, 2, 2, 2]


@pytest.mark.parametrize("n_heads, bytes_per_head, expected", [
    pytest.param(16, 2 << 20, 8, id="16-heads-2MB: 12 fit, the largest divisor of 16 below is 8"),
    pytest.param(16, 1 << 20, 16, id="16-heads-1MB: all"),
    pytest.param(12, 5 << 20, 4, id="12-heads-5MB: 4 fit and divide 12"),
    pytest.param(7, 4 << 20, 1, id="7-heads: a prime head count runs head after head"),
    pytest.param(4, 64 << 20, 1, id="one head over the budget"),
])
def test_packed_head_groups_divide_the_heads_and_keep_within_the_l2_budget(n_heads, bytes_per_head, expected):
    """hopper_tiles.packed_tile interleaves the tiles of a group of heads per sequence; groups must divide the
    head count (the mapping has no ragged last group)."""
    assert hopper.packed_heads_per_group(n_heads, bytes_per_head) == expected


@pytest.mark.parametrize("bias", [
    pytest.param(torch.randn(1, 4, 1, 300) * 30, id="one-row-per-head"),
    pytest.param(torch.randn(2, 1, 1, 130)[..., 2:] * 1e4, id="per-batch-large-values-sliced"),
])
@pytest.mark.parametrize("scale", [0.125, 0.0883883, 3.0], ids=lambda s: f"scale-{s}")
def test_bias_rows_become_the_forwards_key_terms_in_three_bfloat16_parts(monkeypatch, bias, scale):
    """With a positive scale the Hopper forward adds a bias row to the unscaled scores through a tensor-core
    product (hopper_forward ROW_KEYS): each key's term t = row / (scale * log2 e) as three bfloat16 parts summing to
    t within float32's precision; -inf as [-inf, 0, 0]; a soft mask as one power of 2 whose product with the scale
    is exact and at or below -2^100, so every soft-masked key of a row scores the same."""
    bias = bias.clone()
    bias[..., :3] = torch.tensor([float("-inf"), torch.finfo(torch.float32).min, -1e9])
    rows = launch._log2_bias_rows(bias)
    q, k, v = _qkv(s_q=128, s_k=bias.shape[-1], h=4, h_kv=4)
    monkeypatch.setattr(hopper, "sm_count", lambda device_index: 8)  # (the grid's size: no GPU here)
    plan = hopper.forward_plan(q, k, v, rows, None, scale, True, 0)
    assert plan.launch.kwargs["ROW_KEYS"] and plan.launch.kwargs["RAW"] and not plan.launch.kwargs["BIAS_ROW"]
    shape, convert, args = plan.row_keys
    keys = torch.full(shape, float("nan"), dtype=torch.bfloat16)
    convert(rows, keys, *args)
    keys = keys.double()
    assert keys.shape == (bias.shape[0], bias.shape[1], bias.shape[3], 16)
    assert (keys[..., 3:] == 0).all()
    qk_scale2 = scale * 1.4426950408889634
    t = rows.double().squeeze(2) / qk_scale2
    live = torch.isfinite(t) & (rows.squeeze(2) > -(2.0**20))
    torch.testing.assert_close(keys[..., :3].sum(-1)[live], t[live], rtol=2.0**-22, atol=0)
    assert (keys[..., 0, 0] == float("-inf")).all() and (keys[..., 0, 1:] == 0).all()
    soft = keys[..., 1:3, :]  # finfo.min and -1e9 are soft masks
    assert (soft[..., 1:] == 0).all() and (soft[..., 0] == hopper.soft_row_key(qk_scale2)).all()
    kernel_scale2 = torch.tensor(qk_scale2, dtype=torch.float32).item()  # as the kernel takes it
    top = hopper.soft_row_key(qk_scale2) * kernel_scale2  # a soft-masked row's maximum: exact in float32
    assert -(2.0**101) <= top <= -(2.0**100) and torch.tensor(top, dtype=torch.float32).item() == top


@pytest.mark.parametrize("scale, slopes, bias_shape, raw", [
    pytest.param(0.125, False, None, True, id="no-bias"),
    pytest.param(0.125, True, None, True, id="causal-alibi"),
    pytest.param(0.125, False, (1, 4, 1, 128), True, id="bias-row"),
    pytest.param(0.125, True, (1, 4, 1, 128), False, id="bias-row-with-alibi"),
    pytest.param(0.125, False, (1, 4, 128, 128), False, id="bias-matrix"),
    pytest.param(0.0, False, None, False, id="scale-0"),
    pytest.param(-0.3, True, None, False, id="negative-scale"),
    pytest.param(1e-9, False, (1, 4, 1, 128), False, id="bias-row-at-a-tiny-scale"),
])
def test_which_forwards_take_row_maxima_over_unscaled_scores(scale, slopes, bias_shape, raw):
    bias = None if bias_shape is None else torch.randn(bias_shape)
    assert hopper.raw_scores(scale, bias, 1 if slopes else 0) == raw
    assert not hopper.raw_scores(0.125, None, 2)  # symmetric ALiBi: per-row terms


@pytest.mark.parametrize("width, varlen, raw, consumers", [
    pytest.param(64, False, True, 3, id="D64-raw-maxima"),
    pytest.param(64, False, False, 2, id="D64-scaled-form"),
    pytest.param(64, True, True, 2, id="D64-packed-sequences"),
    pytest.param(128, False, True, 2, id="width-128"),
])
def test_consumer_warpgroups_of_the_forward(width, varlen, raw, consumers):
    # three only where their 160 registers hold the block without spilling and the tiles are dense
    assert hopper.forward_consumers(width, varlen, raw) == consumers


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_row_norm_maxima_for_causal_alibis_reach(monkeypatch, dtype):
    """The Hopper forward's plan for causal ALiBi from slopes over at least REACH_MIN_KEYS keys reads q's and k's
    norm maxima first (reach.py): per head, the largest Euclidean norm over the rows, as float32 bit patterns past
    the program slots, q's (B, H) then k's (B, H_kv); a NaN row gives +inf. Also through strided views (an SDPA
    (B, H, S, D) tensor transposed)."""
    monkeypatch.setattr(hopper, "sm_count", lambda device_index: 4)
    monkeypatch.setattr(hopper, "REACH_MIN_KEYS", 100)
    gen = torch.Generator().manual_seed(0)
    q = (torch.randn(2, 4, 150, 64, generator=gen) * torch.arange(1, 5).view(1, 4, 1, 1)).to(dtype).transpose(1, 2)
    k = torch.randn(2, 170, 2, 64, generator=gen).to(dtype)  # more keys than queries (chunked prefill)
    k[1, 77, 1, 3] = float("nan")
    slopes = torch.rand(4) + 0.1
    plan = hopper.forward_plan(q, k, k, None, slopes, 0.125, True, 1)
    assert plan.launch.kwargs["REACH"] and plan.norms is not None
    first = 16 + 4 * hopper.PROGRAM_WORDS
    assert plan.counters == first + 2 * 4 + 2 * 2
    tiles = torch.zeros(plan.counters, dtype=torch.int32)
    norms, args, n_words = plan.norms
    assert n_words == 2 * 4 + 2 * 2
    norms(q, k, tiles, *args)
    got = tiles[first:].view(torch.float32)
    expected = torch.cat([q.float().norm(dim=-1).amax(dim=1).flatten(), k.float().norm(dim=-1).amax(dim=1).flatten()])
    assert got[-1] == float("inf") and expected[-1].isnan()
    torch.testing.assert_close(got[:-1], expected[:-1], rtol=1e-6, atol=0)
    assert (tiles[:first] == 0).all()


@pytest.mark.parametrize("what, applies", [
    pytest.param("causal-alibi", True, id="causal-alibi"),
    pytest.param("short", False, id="fewer-keys-than-REACH_MIN_KEYS"),
    pytest.param("no-alibi", False, id="no-alibi"),
    pytest.param("symmetric", False, id="symmetric-alibi"),
    pytest.param("bias-row", False, id="alibi-with-a-bias-row"),
    pytest.param("row-alone", 2, id="a-bias-row-alone"),
    pytest.param("row-not-causal", False, id="a-bias-row-not-causal"),
    pytest.param("matrix", False, id="a-bias-matrix"),
])
def test_which_forwards_skip_key_blocks_past_alibis_reach(monkeypatch, what, applies):
    """From the slopes (REACH_SLOPES) or from a bias row without slopes (REACH_ROW, with its table's launch)."""
    monkeypatch.setattr(hopper, "sm_count", lambda device_index: 4)
    s_k = 500 if what == "short" else hopper.REACH_MIN_KEYS
    q, k, v = _qkv(s_q=128, s_k=s_k, d=64)
    slopes = None if what in ("no-alibi", "row-alone", "row-not-causal", "matrix") else torch.rand(4)
    bias = None
    if what in ("bias-row", "row-alone", "row-not-causal"):
        bias = launch._log2_bias_rows(torch.randn(1, 4, 1, s_k))
    elif what == "matrix":
        bias = torch.randn(1, 4, 128, s_k, dtype=q.dtype)
    causal = what not in ("symmetric", "row-not-causal")
    mode = 0 if slopes is None else 1 if causal else 2
    plan = hopper.forward_plan(q, k, v, bias, slopes, 0.125, causal, mode)
    assert plan.launch.kwargs["REACH"] == applies and (plan.norms is not None) == bool(applies)
    assert (plan.row_table is not None) == (applies == 2)


@pytest.mark.parametrize("s_k, training, applies", [
    pytest.param(4096, False, True, id="forward-4096"),
    pytest.param(4095, False, False, id="forward-4095"),
    pytest.param(2048, True, True, id="training-2048"),
    pytest.param(2047, True, False, id="training-2047"),
])
def test_a_training_step_takes_the_reach_from_half_the_keys(monkeypatch, s_k, training, applies):
    """A training step reads the norms once for its forward and backward and skips in both, so its forward (the one
    whose norms the backward takes) and every backward take the reach from REACH_MIN_KEYS / 2 keys; a forward alone
    from REACH_MIN_KEYS. Set past any length, neither takes it (the benchmarks' every-block providers)."""
    monkeypatch.setattr(hopper, "sm_count", lambda device_index: 4)
    monkeypatch.setattr(hopper, "FORWARD_TABLE", False)  # (from 2048 to 3071 keys it takes the forward's table)
    q, k, v = _qkv(s_q=128, s_k=s_k, d=64)
    slopes = torch.rand(4)
    assert bool(hopper.reach_applies(None, slopes, True, 1, 2, s_k, training)) == applies
    plan = hopper.forward_plan(q, k, v, None, slopes, 0.125, True, 1, training=training)
    assert bool(plan.launch.kwargs["REACH"]) == applies and (plan.norms is not None) == applies
    monkeypatch.setattr(hopper, "REACH_MIN_KEYS", 1 << 62)
    assert not hopper.reach_applies(None, slopes, True, 1, 2, s_k, training=True)


@pytest.mark.parametrize("what, s_k, applies", [
    pytest.param("training", 1024, True, id="training-1024"),
    pytest.param("training", 3071, True, id="training-3071"),
    pytest.param("training", 1023, False, id="training-1023"),
    pytest.param("training", 3072, False, id="training-3072-norms-reach"),
    pytest.param("alone", 1024, False, id="forward-alone"),
    pytest.param("bias-row", 1024, True, id="a-bias-row"),
    pytest.param("bias-row", 3071, True, id="a-bias-row-3071"),
    pytest.param("bias-row-slopes", 1024, False, id="a-bias-row-with-slopes-scaled-first"),
    pytest.param("bias-row-padding", 1024, False, id="a-key-padding-masks-row"),
    pytest.param("bias-matrix", 1024, False, id="a-bias-matrix"),
    pytest.param("zero-scale", 1024, False, id="scaled-first"),
    pytest.param("switched-off", 1024, False, id="FORWARD_TABLE-off"),
])
def test_a_short_training_forward_writes_the_table_its_backward_reads(monkeypatch, what, s_k, applies):
    """From REACH_MIN_KEYS / 4 to 3 REACH_MIN_KEYS / 4 keys a training step's forward (causal ALiBi from slopes
    alone, or a bias row over the keys alone, unscaled maxima) reads every block and writes one word per (batch,
    head) and 64 query rows past the program slots, where no norm pass or row table runs (a bias row's block terms
    in the slopes' place); its backward's plan, told the table comes, ends its key blocks' queries there
    (REACH_TABLE) and stays the delta kernel's programmatic dependent, since nothing is launched between them."""
    from mpt_attention.impl.triton import hopper_dkdv, reach

    monkeypatch.setattr(hopper, "sm_count", lambda device_index: 4)
    if what == "switched-off":
        monkeypatch.setattr(hopper, "FORWARD_TABLE", False)
    q, k, v = _qkv(s_q=200, s_k=s_k, d=128)
    slopes = None if what in ("bias-row", "bias-row-padding", "bias-matrix") else torch.rand(4)
    bias = None
    if what.startswith("bias-row"):
        bias = launch._log2_bias_rows(torch.randn(1, 4, 1, s_k))
    elif what == "bias-matrix":
        bias = torch.randn(1, 4, 200, s_k, dtype=q.dtype)
    scale = 0.0 if what == "zero-scale" else 0.125
    plan = hopper.forward_plan(q, k, v, bias, slopes, scale, True, 0 if slopes is None else 1,
                               training=what != "alone", row_table=what != "bias-row-padding")
    assert plan.launch.kwargs.get("TABLE", False) == applies and (plan.table is not None) == applies
    if applies:
        first = 16 + 4 * hopper.PROGRAM_WORDS
        assert plan.table == (first, 2 * 4 * 4) and plan.counters == first + 2 * 4 * 4 and plan.norms is None
        assert not plan.launch.kwargs["REACH"] and plan.row_table is None
        n_kb = -(-s_k // hopper.BLOCK_N)  # a bias row's (1, 4, 2, n_kb) block terms: batch stride 0 (broadcast)
        assert plan.row_terms == (None if bias is None else (scale * hopper.LOG2E, hopper.soft_row_key(scale *
                                                                                                      hopper.LOG2E)))
        if bias is not None:
            assert plan.scalars[2:4] == (0, 2 * n_kb)
    elif what == "training":
        assert bool(plan.launch.kwargs["REACH"]) == (s_k >= hopper.REACH_MIN_KEYS // 2)
    row_stats = hopper_dkdv.row_stats_buffer(2, 4, 200, q.device)
    bwd = hopper_dkdv.dkdv_plan(q, k, v, q, row_stats, k, v, bias, slopes, scale, True, 0 if slopes is None else 1,
                                torch.empty_like(q, dtype=torch.float32), forward_table=True)
    takes_table = what != "bias-matrix"  # (told so: the forward writes it only where it applies)
    assert (bwd.launch.kwargs["REACH"] == reach.REACH_TABLE) == takes_table
    if takes_table:
        assert bwd.norms is None and bwd.launch.kwargs.get("PDL") == (bwd.parts is None)


@pytest.mark.parametrize("longest, applies, bwd_applies",
                         [(4096, True, True), (4095, False, True), (2047, False, False)],
                         ids=["longest-4096", "longest-4095", "longest-2047"])
def test_packed_sequences_skip_past_the_reach_with_one_norm_row(monkeypatch, longest, applies, bwd_applies):
    """Packed sequences (attention_varlen) on the Hopper forward take causal ALiBi's reach from REACH_MIN_KEYS keys in
    the longest sequence, with one row of norm maxima per head over every token (q's H words, then k's H_kv): a
    NaN key of the last sequence gives its head +inf. The program slots hold REACH_WORD past the packed coordinates;
    the backward's dK/dV kernel takes the reach with the same norm row (from half as many keys: a training
    step's, ``hopper.reach_applies``)."""
    from mpt_attention.impl.triton import hopper_tiles

    monkeypatch.setattr(hopper, "sm_count", lambda device_index: 4)
    lens = [longest, 700, 300]
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(sum(lens), 4, 64, generator=gen) * torch.arange(1, 5).view(1, 4, 1)
    k = torch.randn(sum(lens), 2, 64, generator=gen)
    k[-1, 1, 5] = float("nan")
    cu = torch.tensor([0] + lens).cumsum(0).to(torch.int32)
    slopes = torch.rand(4) + 0.1
    plan = hopper.forward_plan(q, k, k, None, slopes, 0.125, True, 1, cu, longest, longest)
    assert plan.launch.kwargs["VARLEN"] and plan.launch.kwargs["REACH"] == applies
    assert hopper.PROGRAM_WORDS == hopper_tiles.PROGRAM_WORDS.value == 2 * hopper_tiles.SLOT_WORDS.value
    assert hopper_tiles.REACH_WORD.value >= 8  # past (b, h, start_m, n_blocks, lo_masked, q_start, len_q, len_k)
    # the dK/dV kernel (with the dQ sums, as packed sequences take it): the same norm row
    row_stats = hopper_dkdv.row_stats_buffer(1, 4, q.shape[0], q.device)
    bwd = hopper_dkdv.dkdv_plan(q, k, k, q, row_stats, k, k, None, slopes, 0.125, True, 1, torch.empty_like(q), None,
                                cu, longest, False, None, longest)
    assert bwd.launch.kwargs["VARLEN"] and bwd.launch.kwargs["REACH"] == bwd_applies
    assert (bwd.norms is not None) == bwd_applies and (not bwd_applies or bwd.norms[:2] == (4 + 2, 4 + 2))
    if not applies:
        assert plan.norms is None
        return
    first = 16 + 4 * hopper.PROGRAM_WORDS
    norms, args, n_words = plan.norms
    assert n_words == 4 + 2 and plan.counters == first + n_words
    tiles = torch.zeros(plan.counters, dtype=torch.int32)
    norms(q, k, tiles, *args)  # (the packed tensors as they are: one batch row)
    got = tiles[first:].view(torch.float32)
    expected = torch.cat([q.norm(dim=-1).amax(dim=0), k.norm(dim=-1).amax(dim=0)])
    assert got[-1] == float("inf") and expected[-1].isnan()
    torch.testing.assert_close(got[:-1], expected[:-1], rtol=1e-6, atol=0)


def test_packed_sequences_with_unused_rows_plan_their_own_kernels_without_the_reach(monkeypatch):
    """``seqused`` on the Hopper kernels: both plans take ``VARLEN == PACKED_USED`` (the variant that clears rows past
    the used ones before a product reads them) and no reach, whose norm maxima would span the unused rows; the tiles
    cover every row (those past the used ones write zeros), and each sequence ends at its start plus its used rows."""
    from mpt_attention.impl.triton import hopper_tiles
    from mpt_attention.masks import sequence_ends

    monkeypatch.setattr(hopper, "sm_count", lambda device_index: 4)
    cu = torch.tensor([0, 4096, 8192, 12288], dtype=torch.int32)
    used = torch.tensor([4096, 129, 0], dtype=torch.int32)
    q = torch.randn(12288, 4, 64)
    k = torch.randn(12288, 2, 64)
    slopes = torch.rand(4) + 0.1
    plain = hopper.forward_plan(q, k, k, None, slopes, 0.125, True, 1, cu, 4096, 4096)
    plan = hopper.forward_plan(q, k, k, None, slopes, 0.125, True, 1, cu, 4096, 4096, seqused=True)
    assert plain.launch.kwargs["VARLEN"] == hopper_tiles.PACKED.value and plain.launch.kwargs["REACH"]
    assert plan.launch.kwargs["VARLEN"] == hopper_tiles.PACKED_USED.value and not plan.launch.kwargs["REACH"]
    row_stats = hopper_dkdv.row_stats_buffer(1, 4, q.shape[0], q.device)
    bwd = hopper_dkdv.dkdv_plan(q, k, k, q, row_stats, k, k, None, slopes, 0.125, True, 1, torch.empty_like(q), None,
                                cu, 4096, False, None, 4096, seqused=True)
    assert bwd.launch.kwargs["VARLEN"] == hopper_tiles.PACKED_USED.value and not bwd.launch.kwargs["REACH"]
    assert bwd.norms is None
    assert hopper.packed_tiles(cu).tolist() == [0, 32, 64, 96]  # (every row's tiles: unused ones write zeros)
    assert sequence_ends(cu, used).tolist() == [4096, 4225, 8192]
    assert sequence_ends(cu, None).tolist() == [4096, 8192, 12288]
