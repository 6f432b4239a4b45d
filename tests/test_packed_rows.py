"""attention(sequence_id=...) on the triton backend taken as packed sequences (``packed_rows``): forced on here
(the general kernels' packed path under the interpreter), it must give what the float64 reference gives with
the ids as a mask, the log-sum-exp and every gradient included; inputs where it is not exact keep the masked
dense path."""

import pytest
import torch

import mpt_attention as M
from mpt_attention import ops, packed_rows
from mpt_attention.testing import assert_close_to_reference, assert_gradients_close_to_reference, reference_attention


@pytest.fixture
def calls(monkeypatch):
    """The keyword sets ops.triton_attention was called with."""
    seen = []
    real = ops.triton_attention

    def recording(*args, **kwargs):
        seen.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(ops, "triton_attention", recording)
    return seen


def _ids(rows):
    return torch.tensor(rows, dtype=torch.long)


def _inputs(batch, seq, n_heads, n_kv, head_dim, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, seq, n_heads, head_dim, generator=gen)
    k, v = (torch.randn(batch, seq, n_kv, head_dim, generator=gen) for _ in range(2))
    return [x.requires_grad_() for x in (q, k, v)]


RUNS_37 = [[0] * 10 + [1] * 20 + [2] * 7, [5] * 1 + [6] * 36]  # ragged runs; the second row starts a 1-long one


@pytest.mark.parametrize("causal,alibi,n_kv", [
    pytest.param(True, "heads", 2, id="causal-alibi-per-head-GQA"),
    pytest.param(True, "batch", 4, id="causal-alibi-per-batch-row"),
    pytest.param(False, "heads", 1, id="non-causal-symmetric-alibi-MQA"),
    pytest.param(True, None, 4, id="causal-no-bias"),
])
def test_packed_rows_match_the_masked_reference(monkeypatch, calls, causal, alibi, n_kv):
    monkeypatch.setattr(packed_rows, "ROUTE", True)
    q, k, v = _inputs(2, 37, 4, n_kv, 16)
    ids = _ids(RUNS_37)
    slopes = None
    if alibi == "heads":
        slopes = M.gen_slopes(4, return_1d=True)
    elif alibi == "batch":
        slopes = torch.stack([M.gen_slopes(4, return_1d=True), M.gen_slopes(4, alibi_bias_max=4, return_1d=True)])
    kw = dict(causal=causal, alibi_slopes=slopes, sequence_id=ids)
    out, lse = M.attention(q, k, v, backend="triton", return_lse=True, **kw)
    assert [c.get("cu_seqlens_q") is not None for c in calls] == [True]
    assert calls[0]["cu_seqlens_q"].tolist() == [0, 10, 30, 37, 38, 74]
    ref, ref_lse = reference_attention(q.double(), k.double(), v.double(), **kw)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=0, atol=1e-4)  # the ALiBi shift given back
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, [q, k, v], dout)
    assert_gradients_close_to_reference(out, grads, [q, k, v], kw, dout, torch.float32)


def test_packed_rows_lse_gradient(monkeypatch):
    """A loss on the log-sum-exp too: its gradient passes through the shift the route adds."""
    monkeypatch.setattr(packed_rows, "ROUTE", True)
    q, k, v = _inputs(2, 37, 2, 2, 16, seed=1)
    kw = dict(causal=True, alibi_slopes=M.gen_slopes(2, return_1d=True), sequence_id=_ids(RUNS_37))
    out, lse = M.attention(q, k, v, backend="triton", return_lse=True, **kw)
    dout, dlse = torch.randn_like(out), torch.randn_like(lse)
    grads = torch.autograd.grad([out, lse], [q, k, v], [dout, dlse])
    assert_gradients_close_to_reference(out, grads, [q, k, v], kw, dout, torch.float32, dlse=dlse)


def _strided_keys():
    q, k, v = _inputs(2, 37, 2, 2, 16)
    wide = torch.randn(2, 40, 2, 16)
    return q, wide[:, :37].requires_grad_(), v  # rows 40 apart: no (B * S, H, D) view


NOT_ROUTED = [
    pytest.param(lambda: (_inputs(2, 37, 2, 2, 16), _ids([[1] * 20 + [0] * 17, [0] * 37]), {}),
                 id="a-row-whose-ids-decrease"),
    pytest.param(lambda: (_inputs(2, 37, 2, 2, 16), _ids(RUNS_37), {"dropout_p": 0.1}), id="dropout"),
    pytest.param(lambda: (_inputs(2, 37, 2, 2, 16), _ids(RUNS_37),
                          {"key_padding_mask": torch.ones(2, 37, dtype=torch.bool)}), id="key-padding"),
    pytest.param(lambda: (_strided_keys(), _ids(RUNS_37), {}), id="keys-without-a-packed-view"),
]


@pytest.mark.parametrize("make", NOT_ROUTED)
def test_inputs_the_packed_path_would_change_keep_the_masked_path(monkeypatch, calls, make):
    monkeypatch.setattr(packed_rows, "ROUTE", True)
    (q, k, v), ids, extra = make()
    M.attention(q, k, v, backend="triton", causal=True, sequence_id=ids, **extra)
    assert len(calls) == 1 and calls[0].get("cu_seqlens_q") is None and calls[0]["sequence_id"] is ids


def test_more_keys_than_queries_keep_the_masked_path(monkeypatch, calls):
    monkeypatch.setattr(packed_rows, "ROUTE", True)
    q, _, _ = _inputs(2, 20, 2, 2, 16)
    _, k, v = _inputs(2, 37, 2, 2, 16)
    M.attention(q, k, v, backend="triton", causal=True, sequence_id=_ids(RUNS_37))
    assert calls[0].get("cu_seqlens_q") is None


def test_rows_of_one_sequence_run_dense_without_the_ids(monkeypatch, calls):
    monkeypatch.setattr(packed_rows, "ROUTE", True)
    q, k, v = _inputs(2, 37, 2, 2, 16)
    ids = _ids([[3] * 37, [0] * 37])
    out = M.attention(q, k, v, backend="triton", causal=True, sequence_id=ids)
    assert calls[0].get("cu_seqlens_q") is None and calls[0].get("sequence_id") is None
    ref, _ = reference_attention(q.double(), k.double(), v.double(), causal=True)
    low, _ = reference_attention(q, k, v, causal=True, compute_dtype=torch.float32)
    assert_close_to_reference("out", out, ref, low)


def test_the_runs_follow_ids_changed_in_place(monkeypatch, calls):
    """The runs are kept on the ids tensor between calls (one host read per tensor) until it is modified."""
    monkeypatch.setattr(packed_rows, "ROUTE", True)
    q, k, v = _inputs(1, 37, 2, 2, 16)
    ids = _ids(RUNS_37[:1])
    M.attention(q, k, v, backend="triton", causal=True, sequence_id=ids)
    ids[0, 25:] = 7
    out = M.attention(q, k, v, backend="triton", causal=True, sequence_id=ids)
    assert calls[1]["cu_seqlens_q"].tolist() == [0, 10, 25, 37]
    ref, _ = reference_attention(q.double(), k.double(), v.double(), causal=True, sequence_id=ids)
    low, _ = reference_attention(q, k, v, causal=True, sequence_id=ids, compute_dtype=torch.float32)
    assert_close_to_reference("out", out, ref, low)


def test_off_by_default_without_the_hopper_forward(calls):
    """ROUTE None (the default) takes the packed path only where the Hopper forward would run it."""
    q, k, v = _inputs(2, 37, 2, 2, 16)
    M.attention(q, k, v, backend="triton", causal=True, sequence_id=_ids(RUNS_37))
    assert calls[0].get("cu_seqlens_q") is None
