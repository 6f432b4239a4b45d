"""A causal bias row's reach (reach.row_reach_kernel): the tables the Hopper kernels read to skip key blocks, run under
the interpreter on the CPU. The property that matters is exactness: every block a table skips holds only
probabilities below 2^-VANISH2 (2^-48) of the float64 softmax, for every query it is skipped for; the tables must
also skip something where ALiBi decays, and nothing where the row gives no bound (NaN, soft masks, infinite
norms)."""

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("triton")
from mpt_attention.impl.triton import hopper, hopper_dkdv, hopper_views, launch, reach  # noqa: E402

LOG2E = 1.4426950408889634


def _inputs(s_q, s_k, h, h_kv, d, steep, seed=0, per_batch=False):
    """q, k and MPT's (1, H, 1, S_k) ALiBi row with slopes ``steep / 2^h``; ``per_batch``: a (B, 1, 1, S_k) row
    instead, slopes ``steep / 16^b``."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, s_q, h, d, generator=gen)
    k = torch.randn(2, s_k, h_kv, d, generator=gen)
    n = 2 if per_batch else h
    slopes = torch.tensor([steep / (16 if per_batch else 2) ** i for i in range(n)])
    slopes = slopes.view((n, 1, 1, 1) if per_batch else (1, n, 1, 1))
    return q, k, slopes * (torch.arange(s_k) - (s_k - 1)).view(1, 1, 1, s_k)


def _tables(q, k, bias, scale, monkeypatch):
    """The forward's first block per query tile and the backward's query end per key block, as the launches make
    them (the norm maxima, the converted row's prefix maxima, then the table)."""
    monkeypatch.setattr(hopper, "REACH_MIN_KEYS", 16)
    monkeypatch.setattr(hopper, "sm_count", lambda device_index: 4)
    rows = launch._log2_bias_rows(bias)
    plan = hopper.forward_plan(q, k, k, rows, None, scale, True, 0)
    assert plan.launch.kwargs["REACH"] == reach.REACH_ROW and plan.row_table is not None
    tiles = torch.zeros(plan.counters, dtype=torch.int32)
    norms, args, _ = plan.norms
    norms(q, k, tiles, *args)
    table, args = plan.row_table
    table(tiles, reach.row_prefix_max(rows), rows, reach.row_ends(rows, hopper.BLOCK_N), tiles, *args)
    batch, s_q, n_heads = q.shape[:3]
    tile_m = plan.launch.kwargs["CONSUMERS"] * hopper.HALF_M
    n_m = -(-s_q // tile_m)
    n_bh = batch * n_heads
    first = tiles[-n_bh * (n_m + 1):-n_bh].view(batch, n_heads, n_m)
    ends = tiles[-n_bh:].view(batch, n_heads)
    n_kb = -(-k.shape[1] // hopper_dkdv.BWD_BLOCK_N)
    n_words = batch * (n_heads + k.shape[2])
    words = torch.zeros(n_words + batch * n_heads * n_kb, dtype=torch.int32)
    norm_launch, norm_args, norm_words = reach.norm_launch(q, k, 0)
    assert norm_words == n_words
    norm_launch(q, k, words, *norm_args)
    table, args = reach.row_reach_launch(rows, hopper_views.bias_dims_on(rows), q, k, scale * LOG2E, n_kb, 0,
                                          hopper_dkdv.BWD_BLOCK_N, 0, n_words, True)
    table(words, reach.row_prefix_max(rows), rows, words, words, *args)
    norms_at = 16 + plan.launch.grid[0] * hopper.PROGRAM_WORDS  # past the counters and the programs' slots (<= 4)
    assert torch.equal(words[:n_words], tiles[norms_at:norms_at + n_words])
    return first, tile_m, words[n_words:].view(batch, n_heads, n_kb), ends


def _log2_probabilities(q, k, bias, scale):
    """(B, H, S_q, S_k) float64 log2 probabilities of causal attention with the bias row (bottom-right aligned)."""
    s_q, s_k = q.shape[1], k.shape[1]
    groups = q.shape[2] // k.shape[2]
    kk = k.double().repeat_interleave(groups, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), kk) * scale + bias.double()
    visible = torch.arange(s_k)[None, :] <= torch.arange(s_q)[:, None] + (s_k - s_q)
    scores = scores.masked_fill(~visible, float("-inf"))
    return (scores - torch.logsumexp(scores, -1, keepdim=True)) * LOG2E


def _assert_ends(ends, bias):
    """The forward's end per (batch, head) is the block after the row's last key that is not removed: every key from
    it on is -inf in the row (its probability exactly 0 for every query, its block adds nothing), the block before it
    holds a key that is not."""
    batch, n_heads = ends.shape
    row = bias.expand(batch, n_heads, 1, bias.shape[-1])[:, :, 0]
    block = hopper.BLOCK_N
    for b in range(batch):
        for h in range(n_heads):
            end = int(ends[b, h]) * block
            assert (row[b, h, end:] == float("-inf")).all(), (b, h)
            assert end == 0 or (row[b, h, end - block:end] != float("-inf")).any(), (b, h)


def _assert_every_query_block_visited(q_end, s_q, s_k):
    """The dQ sums' first writes (``hopper_dkdv.first_write_dq``) need each 64-query block visited by some key block
    of the dK/dV kernel: causal key block ``e`` visits the blocks from its first query's (``lo``) to its table end,
    at least one step. The block holding the largest term up to a query block's first row always qualifies."""
    block, rows = hopper_dkdv.BWD_BLOCK_N, 64
    los = [max(e * block - (s_k - s_q), 0) // rows * rows for e in range(q_end.shape[2])]
    ends = [q_end[..., e].clamp(min=lo + 1) for e, lo in enumerate(los)]
    for start in range(0, s_q, rows):
        seen = torch.stack([(end > start) & (lo <= start) for end, lo in zip(ends, los)]).any(0)
        assert seen.all(), (start, (~seen).nonzero().tolist())


def _assert_sound(first, tile_m, q_end, logp):
    """Every block a table skips holds only log2 probabilities below -VANISH2 for the queries it is skipped for, and
    every query block is visited (``_assert_every_query_block_visited``); returns how many (tile, head) and (key block,
    head) entries skip anything."""
    batch, n_heads, s_q, s_k = logp.shape
    block = hopper.BLOCK_N
    skipped_fwd = skipped_bwd = 0
    for b in range(batch):
        for h in range(n_heads):
            for m in range(first.shape[2]):
                rows = slice(m * tile_m, min((m + 1) * tile_m, s_q))
                keys = int(first[b, h, m]) * block
                assert keys <= max(0, m * tile_m + s_k - s_q)  # never past the tile's first query
                assert (logp[b, h, rows, :keys] < -reach.VANISH2.value).all(), (b, h, m)
                skipped_fwd += keys > 0
            for kb in range(q_end.shape[2]):
                end = int(q_end[b, h, kb])
                assert end == s_q or end % reach.ROW_STEP == 0
                assert (logp[b, h, end:, kb * block:(kb + 1) * block] < -reach.VANISH2.value).all(), (b, h, kb)
                skipped_bwd += end < s_q
    _assert_every_query_block_visited(q_end, s_q, s_k)
    return skipped_fwd, skipped_bwd


@pytest.mark.parametrize("s_q, s_k, h, h_kv, d, per_batch", [
    pytest.param(600, 600, 4, 2, 32, False, id="gqa-4-2"),
    pytest.param(300, 700, 2, 2, 64, False, id="chunked-prefill"),
    pytest.param(97, 611, 3, 1, 16, False, id="odd-lengths-mqa"),
    pytest.param(600, 600, 2, 2, 32, True, id="row-per-batch"),
])
def test_row_reach_tables_skip_only_vanishing_probabilities(monkeypatch, s_q, s_k, h, h_kv, d, per_batch):
    q, k, bias = _inputs(s_q, s_k, h, h_kv, d, steep=2.0, per_batch=per_batch)
    scale = d ** -0.5
    first, tile_m, q_end, ends = _tables(q, k, bias, scale, monkeypatch)
    skipped_fwd, skipped_bwd = _assert_sound(first, tile_m, q_end, _log2_probabilities(q, k, bias, scale))
    assert (ends == -(-s_k // hopper.BLOCK_N)).all()  # (no key removed)
    assert skipped_fwd > 0 and skipped_bwd > 0
    if per_batch:  # the steep batch row skips more than the flatter one, for every head
        assert (first[0].sum(-1) > first[1].sum(-1)).all() and (q_end[0].sum(-1) < q_end[1].sum(-1)).all()


def test_row_reach_tables_follow_the_data_not_the_slope(monkeypatch):
    """The same steep row, with one key per head made to dominate: the tables keep its block for every later query;
    and query and key norms large enough to outweigh the row keep every block."""
    q, k, bias = _inputs(600, 600, 2, 2, 32, steep=2.0, seed=1)
    scale = 32 ** -0.5
    first, _, q_end, _ = _tables(q, k, bias, scale, monkeypatch)
    assert (first[:, 0, -1] > 0).all() and (q_end[:, 0, 0] < 600).all()
    lifted = bias.clone()
    lifted[..., 5] = 0.0  # key 5 scores like the diagonal: never out of reach
    first, _, q_end, _ = _tables(q, k, lifted, scale, monkeypatch)
    assert (first == 0).all() and (q_end[:, :, 0] == 600).all()
    first, _, q_end, _ = _tables(q * 40, k * 40, bias, scale, monkeypatch)
    assert (first == 0).all() and (q_end == 600).all()


@pytest.mark.parametrize("what", ["nan-query", "nan-key", "nan-bias", "soft-masked-start", "removed-start"])
def test_row_reach_tables_take_nothing_from_rows_without_a_bound(monkeypatch, what):
    """A NaN in q or k makes its head's norm bound infinite: no reach (the reference's rows are NaN); a NaN in the
    row makes every prefix from it NaN: no skip from it on. Keys soft-masked by MPT's finfo.min bias or removed by
    -inf are skipped only behind a real score, and a query whose prefix is all soft or removed takes nothing."""
    q, k, bias = _inputs(600, 600, 2, 2, 32, steep=2.0, seed=2)
    if what == "nan-query":
        q[1, 30, 1, 3] = float("nan")
    elif what == "nan-key":
        k[0, 7, 0, 3] = float("nan")
    elif what == "nan-bias":
        bias[0, 1, 0, 40] = float("nan")
    elif what == "soft-masked-start":
        bias[..., :200] = torch.finfo(torch.float32).min
    elif what == "removed-start":
        bias[..., :200] = float("-inf")
    scale = 32 ** -0.5
    first, tile_m, q_end, ends = _tables(q, k, bias, scale, monkeypatch)
    if what.startswith("nan"):  # the head with the NaN takes nothing; the others still skip
        nan_head = {"nan-query": (1, 1), "nan-key": (0, 0), "nan-bias": (slice(None), 1)}[what]
        assert (first[nan_head] == 0).all() and (q_end[nan_head] == 600).all()
        assert (first[0, 0 if what == "nan-bias" else 1, -1] > 0) and (q_end[1, 0, 0] < 600)
        return
    # no real score before key 200: the queries before it skip nothing, later ones the masked blocks and more
    assert (first[..., 0] == 0).all() and (first[:, 0, -1] >= 2).all() and (q_end[:, 0, 0] < 600).all()
    logp = _log2_probabilities(q, k, bias, scale)
    _assert_sound(first, tile_m, q_end, logp.nan_to_num(nan=0.0))  # (a row with every key removed: never skipped)
    _assert_ends(ends, bias)


@pytest.mark.parametrize("removed", ["-inf", "soft"])
def test_backward_table_ends_a_block_of_removed_keys_at_once(monkeypatch, removed):
    """A padded batch row's end (key_padding_mask on the Hopper kernels: launch.forward's bias row) or keys
    soft-masked after real ones: a key block holding nothing else weighs 0 for every query that saw a real key, so
    its backward query end is 0 (the kernel still takes one step), where the prefix maximum at its last key would
    keep it for every later query; blocks whose queries ended before the cut keep their end. The forward's tiles end
    after the last block with a key not removed (a soft-masked key still counts for a query that sees only such)."""
    q, k, bias = _inputs(600, 600, 2, 2, 32, steep=2.0, seed=3)
    scale = 32 ** -0.5
    _, _, q_end, _ = _tables(q, k, bias, scale, monkeypatch)
    cut = bias.clone()
    cut[..., 400:] = float("-inf") if removed == "-inf" else torch.finfo(torch.float32).min
    first, tile_m, cut_end, ends = _tables(q, k, cut, scale, monkeypatch)
    whole = -(-400 // hopper_dkdv.BWD_BLOCK_N)  # key blocks from here on hold only removed keys
    assert (cut_end[..., whole:] == 0).all()
    before = q_end[..., :whole] <= 400  # blocks whose queries ended before the cut: as they were
    assert before.any() and torch.equal(cut_end[..., :whole][before], q_end[..., :whole][before])
    _assert_sound(first, tile_m, cut_end, _log2_probabilities(q, k, cut, scale))
    _assert_ends(ends, cut)
    assert (ends == (whole if removed == "-inf" else -(-600 // hopper.BLOCK_N))).all()  # (soft: not removed)


@st.composite
def _rows(draw):
    """Any bias row over the keys, not only ALiBi's line: a line, a random walk that drifts upwards (not monotone), or
    plateaus with jumps; per head, per batch row or shared; some keys soft-masked (MPT's finfo.min) or removed."""
    s_k = draw(st.integers(130, 700))
    s_q = draw(st.sampled_from([s_k, draw(st.integers(1, s_k))]))
    h_kv = draw(st.sampled_from([1, 2]))
    h = h_kv * draw(st.sampled_from([1, 2]))
    d = draw(st.sampled_from([16, 32]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 16)))
    n_b, n_h = draw(st.sampled_from([(1, h), (2, 1), (1, 1)]))
    kind = draw(st.sampled_from(["line", "walk", "plateaus"]))
    keys = torch.arange(s_k, dtype=torch.float64)
    if kind == "line":
        row = draw(st.floats(0.05, 4.0)) * (keys - (s_k - 1)).expand(n_b, n_h, 1, s_k)
    elif kind == "walk":
        steps = draw(st.floats(0.1, 3.0)) + draw(st.floats(0.0, 5.0)) * torch.randn(n_b, n_h, 1, s_k, generator=gen,
                                                                                     dtype=torch.float64)
        row = steps.cumsum(-1)
    else:
        jumps = (torch.rand(n_b, n_h, 1, s_k, generator=gen, dtype=torch.float64) < 0.02) * 200.0
        row = jumps.cumsum(-1) + 0.01 * torch.randn(n_b, n_h, 1, s_k, generator=gen, dtype=torch.float64)
    row = (row - row.amax(-1, keepdim=True)).float().contiguous()
    masked = torch.rand(row.shape, generator=gen) < draw(st.sampled_from([0.0, 0.1, 0.5]))
    row = row.masked_fill(masked, draw(st.sampled_from([torch.finfo(torch.float32).min, float("-inf")])))
    spread = draw(st.floats(0.3, 3.0))
    q = torch.randn(2, s_q, h, d, generator=gen) * spread
    k = torch.randn(2, s_k, h_kv, d, generator=gen) * spread
    return q, k, row, draw(st.sampled_from([d ** -0.5, 0.0, 1.0]))


@settings(max_examples=int(os.environ.get("MPT_ATTENTION_FUZZ_EXAMPLES", "30")) // 2, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(_rows())
def test_row_reach_tables_are_exact_for_any_row(monkeypatch, drawn):
    """Randomized rows, masks, lengths, head groupings and scales: every block the tables skip holds only log2
    probabilities below -VANISH2 of the float64 softmax, for every query it is skipped for."""
    q, k, row, scale = drawn
    first, tile_m, q_end, ends = _tables(q, k, row, scale, monkeypatch)
    logp = _log2_probabilities(q, k, row, scale)
    _assert_sound(first, tile_m, q_end, logp.nan_to_num(nan=0.0))  # (a row with every key removed: never skipped)
    _assert_ends(ends, row)


def _general_case(seed=7):
    """q, k, v (1, 256, 2, 16) and slopes of a steep head (its reach ~50 keys) and a flat one (past the sequence)."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, 256, 2, 16, generator=gen) for _ in range(3))
    return q, k, v, torch.tensor([2.0, 2.0 ** -8])


def test_general_kernels_skip_only_blocks_past_the_reach(monkeypatch):
    """The general kernels (the interpreter's, as on GPUs without the Hopper kernels) with causal ALiBi from slopes
    skip key blocks past each head's reach: forward and dQ (query tiles start there) and dK/dV (key blocks end their
    queries there). NaN in V's first 64 keys reaches only the steep head's early rows and every row of the flat head;
    NaN in dO's last 32 rows reaches only the steep head's late key blocks; the clean results match computing every
    block and the float64 reference."""
    import mpt_attention as M
    from mpt_attention.testing import assert_close_to_reference, reference_attention

    q, k, v, slopes = _general_case()
    kw = dict(backend="triton", causal=True, alibi_slopes=slopes)
    monkeypatch.setattr(hopper, "REACH_MIN_KEYS", 16)
    assert launch._general_reach(None, slopes, None, None, None, True, False, 1, 256, False)
    v_nan = v.clone()
    v_nan[:, :64] = float("nan")
    out = M.attention(q, k, v_nan, **kw)
    assert out[0, 192:, 0].isfinite().all() and out[0, :64, 0].isnan().all() and out[0, :, 1].isnan().all()
    xs = [x.clone().requires_grad_() for x in (q, k, v_nan)]
    dq = torch.autograd.grad(M.attention(*xs, **kw), xs[0], torch.randn(q.shape))[0]
    assert dq[0, 192:, 0].isfinite().all() and dq[0, :, 1].isnan().all()
    dout_nan = torch.randn(q.shape)
    dout_nan[:, -32:] = float("nan")
    xs = [x.clone().requires_grad_() for x in (q, k, v)]
    _, dk, dv = torch.autograd.grad(M.attention(*xs, **kw), xs, dout_nan)
    for g in (dk, dv):
        assert g[0, :96, 0].isfinite().all() and g[0, -32:, 0].isnan().all() and g[0, :, 1].isnan().all()

    dout = torch.randn(q.shape)

    def run(min_keys, dtype=torch.float32):
        monkeypatch.setattr(hopper, "REACH_MIN_KEYS", min_keys)
        xs = [x.to(dtype).requires_grad_() for x in (q, k, v)]
        out = M.attention(*xs, **kw)
        return [out.detach(), *torch.autograd.grad(out, xs, dout.to(dtype))]

    skipped, every = run(16), run(1 << 62)
    for name, a, b in zip(["out", "dq", "dk", "dv"], skipped, every):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    refs = []
    for dtype in (torch.float64, torch.float16):
        xs = [x.to(dtype).requires_grad_() for x in (q, k, v)]
        ref, _ = reference_attention(*xs, causal=True, alibi_slopes=slopes, compute_dtype=dtype)
        refs.append([ref.detach(), *torch.autograd.grad(ref, xs, dout.to(dtype))])
    for name, got, ref, low in zip(["out", "dq", "dk", "dv"], run(16, torch.float16), *refs):
        assert_close_to_reference(name, got, ref, low)



def test_a_training_step_skips_past_the_reach_from_half_the_keys(monkeypatch):
    """Between REACH_MIN_KEYS / 2 and REACH_MIN_KEYS keys only a training step skips past the reach: its forward
    (grad mode on, an input needing a gradient) reads the norms and hands them to its backward (one norm pass per
    step), while a forward alone (no input needing one, or under ``no_grad``) computes every block. NaN in V's first
    64 keys shows which: every row that sees them is NaN without the skip, the steep head's late rows stay finite
    with it."""
    import mpt_attention as M

    q, k, v, slopes = _general_case()  # 256 keys
    monkeypatch.setattr(hopper, "REACH_MIN_KEYS", 400)
    passes, real = [], launch.norm_launch
    monkeypatch.setattr(launch, "norm_launch", lambda *args: passes.append(1) or real(*args))
    v_nan = v.clone()
    v_nan[:, :64] = float("nan")
    kw = dict(backend="triton", causal=True, alibi_slopes=slopes)
    xs = [x.clone().requires_grad_() for x in (q, k, v_nan)]
    for alone in (M.attention(q, k, v_nan, **kw), torch.no_grad()(M.attention)(*xs, **kw)):
        assert alone[0, 64:, 0].isnan().all() and passes == []
    out = M.attention(*xs, **kw)
    assert out[0, 192:, 0].isfinite().all() and out[0, :64, 0].isnan().all() and len(passes) == 1
    dq = torch.autograd.grad(out, xs[0], torch.randn(q.shape))[0]
    assert dq[0, 192:, 0].isfinite().all() and len(passes) == 1  # the backward took the forward's norms


def test_general_kernels_skip_past_the_reach_in_packed_sequences(monkeypatch):
    """``attention_varlen`` on the general kernels skips key blocks past causal ALiBi's reach in each sequence, the
    bound from each head's norm maxima over every token (``reach.norm_row``): NaN in every sequence's first 64
    keys of V reaches only rows within the steep head's reach of them (all rows of the flat head); dO's NaN in each
    sequence's last 32 rows reaches only the steep head's late key blocks; clean results match computing every
    block and the float64 reference. Sequences of 256, 200 (chunked prefill: 150 queries) and 90 keys."""
    import mpt_attention as M
    from mpt_attention.testing import assert_close_to_reference, make_varlen_inputs, reference_attention_varlen

    gen = torch.Generator().manual_seed(11)
    lens_k = [256, 200, 90]
    q, k, v, cu_q, cu_k = make_varlen_inputs([256, 150, 90], lens_k, 2, 2, 16, seed=11)
    slopes = torch.tensor([2.0, 2.0 ** -8])
    kw = dict(backend="triton", causal=True, alibi_slopes=slopes)
    monkeypatch.setattr(hopper, "REACH_MIN_KEYS", 16)
    assert launch._general_reach(None, slopes, None, None, None, True, True, 3, max(lens_k), False)
    first_keys = torch.cat([torch.arange(int(c), int(c) + 64) for c in cu_k[:-1]])
    last_rows = torch.cat([torch.arange(int(c) - 32, int(c)) for c in cu_q[1:]])
    v_nan = v.clone()
    v_nan[first_keys] = float("nan")
    out = M.attention_varlen(q, k, v_nan, cu_q, cu_k, **kw)
    # the first sequence's rows from 192 and the second's from 150 - 32 (their positions past 168) see no key below 64
    assert out[192:256, 0].isfinite().all() and out[256 + 118:256 + 150, 0].isfinite().all()
    assert out[:64, 0].isnan().all() and out[:, 1].isnan().all()
    dout_nan = torch.randn(q.shape, generator=gen)
    dout_nan[last_rows] = float("nan")
    xs = [x.clone().requires_grad_() for x in (q, k, v)]
    _, dk, dv = torch.autograd.grad(M.attention_varlen(*xs, cu_q, cu_k, **kw), xs, dout_nan)
    for g in (dk, dv):  # keys far behind a sequence's last 32 rows (positions 224 and 168 on) take nothing from them
        assert g[:96, 0].isfinite().all() and g[256:256 + 64, 0].isfinite().all()
        assert g[224:256, 0].isnan().all() and g[256 + 168:456, 0].isnan().all() and g[:, 1].isnan().all()

    dout = torch.randn(q.shape, generator=gen)

    def run(min_keys, dtype=torch.float32, deterministic=None):
        monkeypatch.setattr(hopper, "REACH_MIN_KEYS", min_keys)
        xs = [x.to(dtype).requires_grad_() for x in (q, k, v)]
        out = M.attention_varlen(*xs, cu_q, cu_k, deterministic=deterministic, **kw)
        return [out.detach(), *torch.autograd.grad(out, xs, dout.to(dtype))]

    every = run(1 << 62)
    for deterministic in (None, False):  # dQ from its own pass, or added by the dK/dV kernel (float32 atomics)
        for name, a, b in zip(["out", "dq", "dk", "dv"], run(16, deterministic=deterministic), every):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"{name} deterministic={deterministic}")
    refs = []
    for dtype in (torch.float64, torch.float16):
        xs = [x.to(dtype).requires_grad_() for x in (q, k, v)]
        ref, _ = reference_attention_varlen(*xs, cu_q, cu_k, causal=True, alibi_slopes=slopes, compute_dtype=dtype)
        refs.append([ref.detach(), *torch.autograd.grad(ref, xs, dout.to(dtype))])
    for name, got, ref, low in zip(["out", "dq", "dk", "dv"], run(16, torch.float16), *refs):
        assert_close_to_reference(name, got, ref, low)

def _steep_varlen_case():
    """Three packed sequences (37, 111 and 97 queries over 37, 150 and 97 keys: one a chunked prefill) of
    ``_general_case``'s heads, slopes one row per sequence."""
    gen = torch.Generator().manual_seed(3)
    cu_q, cu_k = torch.tensor([0, 37, 148, 245], dtype=torch.int32), torch.tensor([0, 37, 187, 284], dtype=torch.int32)
    q = torch.randn(245, 2, 16, generator=gen)
    k, v = (torch.randn(284, 2, 16, generator=gen) for _ in range(2))
    slopes = torch.tensor([[2.0, 2.0 ** -8], [2.0, 1.0], [1.5, 2.0]])
    return q, k, v, slopes, cu_q, cu_k


@pytest.mark.parametrize("layout", [
    pytest.param("dense", id="dense-s256"),
    pytest.param("chunked", id="chunked-prefill-97-of-256"),
    pytest.param("varlen", id="packed-sequences"),
])
def test_float32_steep_alibi_meets_the_tolerance_rule(layout):
    """Float32 with steep causal ALiBi (slope 2; session 43's case): the general kernels measure ALiBi from each
    row's diagonal (common.ALIBI_CAUSAL_DIAGONAL), so out, the returned log-sum-exp (MPT's, ops.public_lse) and
    the gradients of ``out * dout + lse * dlse`` meet the 2x rule against the float64 reference, with torch's
    float32 math as the low-precision error. MPT's own form missed it: dQ 5.4e-5 against a budget of 3.6e-5."""
    import mpt_attention as M
    from mpt_attention.testing import assert_close_to_reference, reference_attention, reference_attention_varlen

    if layout == "varlen":
        q, k, v, slopes, cu_q, cu_k = _steep_varlen_case()
        lens = dict(max_seqlen_q=111, max_seqlen_k=150)

        def run(xs, backend):
            if backend:
                return M.attention_varlen(*xs, cu_q, cu_k, **lens, backend=backend, causal=True, alibi_slopes=slopes,
                                          return_lse=True)
            return reference_attention_varlen(*xs, cu_q, cu_k, causal=True, alibi_slopes=slopes,
                                              compute_dtype=xs[0].dtype)
    else:
        q, k, v, slopes = _general_case()
        if layout == "chunked":
            q = q[:, -97:]

        def run(xs, backend):
            if backend:
                return M.attention(*xs, backend=backend, causal=True, alibi_slopes=slopes, return_lse=True)
            return reference_attention(*xs, causal=True, alibi_slopes=slopes, compute_dtype=xs[0].dtype)
    gen = torch.Generator().manual_seed(1)
    dout = torch.randn(q.shape, generator=gen)
    results = []
    for dtype, backend in ((torch.float32, "triton"), (torch.float64, None), (torch.float32, None)):
        xs = [x.to(dtype).requires_grad_() for x in (q, k, v)]
        out, lse = run(xs, backend)
        dlse = torch.randn(lse.shape, generator=torch.Generator().manual_seed(2)).to(dtype)
        results.append([out.detach(), lse.detach(), *torch.autograd.grad([out, lse], xs, [dout.to(dtype), dlse])])
    for name, got, ref, low in zip(["out", "lse", "dq", "dk", "dv"], *results):
        assert_close_to_reference(name, got, ref, low)


def _row_table_as_the_forward_writes_it(q, k, bias, scale, block_n=128):
    """``hopper_forward.store_row_first_block``'s rule in float64 on the forward's own quantities: each row's
    largest score per key block (unscaled units: q.k + t, t = row / scale, soft masks as the kernel's term), less the
    block's least kept term (``reach.row_block_terms``), maximised over its blocks, against the prefix maxima of the
    blocks' least terms and the row's maximum; each 64 rows' first block (the least over its rows)."""
    s_q, s_k = q.shape[1], k.shape[1]
    scale2 = scale * LOG2E
    rows = launch._log2_bias_rows(bias)
    terms = reach.row_block_terms(rows, scale2, hopper.soft_row_key(scale2), block_n).double()
    t = torch.where(rows[:, :, 0] == -(2.0 ** 100), hopper.soft_row_key(scale2), rows[:, :, 0] / scale2).double()
    kk = k.double().repeat_interleave(q.shape[2] // k.shape[2], dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q.double(), kk) + t.unsqueeze(2)  # [B, H, S_q, S_k] unscaled
    pos = torch.arange(s_q) + (s_k - s_q)
    s = s.masked_fill(torch.arange(s_k)[None, :] > pos[:, None], float("-inf"))
    n_kb = -(-s_k // block_n)
    top = torch.nn.functional.pad(s, (0, n_kb * block_n - s_k), value=float("-inf")).unflatten(-1, (n_kb, block_n))
    top = top.amax(-1)  # [B, H, S_q, n_kb]
    low, prefix = terms[:, :, 0].unsqueeze(2), terms[:, :, 1].unsqueeze(2)  # [B', H', 1, n_kb]
    row_top = (top - low).amax(-1, keepdim=True)
    m = (s.amax(-1, keepdim=True) * scale2)
    past = (row_top + prefix) * scale2 < m - 48.0 - 1.0
    first = torch.minimum(past.sum(-1), torch.div(pos, block_n, rounding_mode="floor"))
    n_w = -(-s_q // 64)
    first = torch.nn.functional.pad(first, (0, n_w * 64 - s_q), value=1 << 30).unflatten(-1, (n_w, 64)).amin(-1)
    return first  # [B, H, S_q / 64]


@pytest.mark.parametrize("what", ["mpt-alibi", "removed-keys", "soft-masked-keys", "nan", "random-row"])
def test_a_row_table_from_the_forwards_scores_skips_only_vanishing_probabilities(what):
    """The training forward's table from a bias row (``hopper.forward_table_applies``), its rule emulated in float64
    over ``reach.row_block_terms``: every key block it leaves out holds probabilities below 2^-48 of each of its rows'
    largest, where ALiBi decays it leaves blocks out; a soft-masked term leaves none out, a NaN none behind it."""
    q, k, bias = _inputs(700, 1100, 4, 2, 64, steep=2.0, seed=5)
    scale = 64 ** -0.5
    if what == "removed-keys":
        bias[..., 300:420] = float("-inf")
    elif what == "soft-masked-keys":
        bias[..., 100:140] = torch.finfo(torch.float32).min
    elif what == "nan":
        bias[0, 0, 0, 500] = float("nan")
    elif what == "random-row":
        bias = torch.randn(2, 4, 1, 1100) * 20
    first = _row_table_as_the_forward_writes_it(q, k, bias, scale).long()
    logp = _log2_probabilities(q, k, bias, scale)  # [B, H, S_q, S_k]
    rows_w = torch.arange(700) // 64
    left_out = torch.arange(1100).view(1, 1, 1, -1) < (first.expand(2, 4, -1)[..., rows_w] * 128).unsqueeze(-1)
    low = logp - logp.amax(-1, keepdim=True)
    assert (low[left_out].nan_to_num(nan=-1e9) < -48).all()
    if what in ("mpt-alibi", "removed-keys"):
        assert (first[:, 0, -1] >= 2).all()  # the steep head leaves far blocks out
    elif what == "soft-masked-keys":  # a row with a soft-masked key bounds nothing (its float32 terms would not)
        assert (first == 0).all()
    elif what == "nan":  # the NaN's head takes nothing from the NaN's block on
        assert (first[:, 0, 4:] == 0).all() and (first[:, 1, -1] >= 1).all()


def test_row_block_terms_hold_each_blocks_least_kept_term_and_the_prefix_maxima():
    """``reach.row_block_terms``: per 128-key block the least term of its kept keys (+inf for a block of removed keys
    only), then the running maximum of those (such a block counted -inf), in unscaled units; +inf throughout for a
    row with a soft-masked key; kept on the row."""
    rows = launch._log2_bias_rows(torch.tensor([[[[-3.0] * 128 + [float("-inf")] * 130 + [1.0, -5.0]]]]))
    scale2 = 0.5
    terms = reach.row_block_terms(rows, scale2, hopper.soft_row_key(scale2), 128)
    l2 = LOG2E / scale2
    expected = torch.tensor([[-3.0 * l2, float("inf"), -5.0 * l2], [-3.0 * l2, -3.0 * l2, -3.0 * l2]])
    torch.testing.assert_close(terms[0, 0], expected)
    assert reach.row_block_terms(rows, scale2, hopper.soft_row_key(scale2), 128) is terms
    soft = launch._log2_bias_rows(torch.tensor([[[[-3.0] * 200 + [torch.finfo(torch.float32).min] + [0.0] * 59]]]))
    terms = reach.row_block_terms(soft, scale2, hopper.soft_row_key(scale2), 128)
    assert terms[0, 0, 0, 1] == hopper.soft_row_key(scale2) and (terms[0, 0, 1] == float("inf")).all()
