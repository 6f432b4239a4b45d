"""Every rejected input raises before any kernel runs, with a message naming the offending value."""

import pytest
import torch

import mpt_attention as M

B, S, H, D = 2, 8, 4, 16


def qkv(**over):
    shapes = dict(q=(B, S, H, D), k=(B, S, 2, D), v=(B, S, 2, D))
    shapes.update(over)
    return [torch.randn(*shapes[n]) for n in ("q", "k", "v")]


BAD_OP_INPUTS = [
    ("3d-q", dict(q=(B, S, H * D)), {}, ValueError, r"q must be a 4-D tensor \(B, S, H, D\), got \(2, 8, 64\)"),
    ("kv-shape", dict(v=(B, S + 1, 2, D)), {}, ValueError, r"k and v must have the same shape"),
    ("head-dim", dict(k=(B, S, 2, 8), v=(B, S, 2, 8)), {}, ValueError, r"must agree in batch and head dim"),
    ("heads", dict(k=(B, S, 3, D), v=(B, S, 3, D)), {}, ValueError,
     r"H_q=4 must be a multiple of key/value heads H_kv=3"),
    ("mask-dtype", {}, dict(key_padding_mask=torch.ones(B, S, dtype=torch.int64)), ValueError,
     r"key_padding_mask must be bool \(B, S_k\)=\(2, 8\) with True = keep, got torch.int64"),
    ("mask-shape", {}, dict(key_padding_mask=torch.ones(B, S + 1, dtype=torch.bool)), ValueError,
     r"key_padding_mask must be bool .* got torch.bool \(2, 9\)"),
    ("bias-broadcast", {}, dict(attn_bias=torch.zeros(1, 3, 1, S)), ValueError,
     r"attn_bias must be a float tensor broadcastable to \(B, H_q, S_q, S_k\)=\(2, 4, 8, 8\), "
     r"got torch.float32 \(1, 3, 1, 8\)"),
    ("bias-3d", {}, dict(attn_bias=torch.zeros(H, S, S)), ValueError, r"attn_bias must be a float tensor"),
    ("slopes", {}, dict(alibi_slopes=torch.ones(3)), ValueError, r"alibi_slopes must be float \(H_q,\)=\(4,\)"),
    ("seqid-float", {}, dict(sequence_id=torch.zeros(B, S)), ValueError, r"sequence_id must be an integer tensor"),
    ("seqid-more-queries", dict(q=(B, S + 1, H, D)), dict(sequence_id=torch.zeros(B, S, dtype=torch.long)), ValueError,
     r"sequence_id needs S_q <= S_k .* got S_q=9 > S_k=8"),
    ("prefix-no-causal", {}, dict(prefix_mask=torch.ones(B, S, dtype=torch.bool)), ValueError, r"needs causal=True"),
    ("dropout", {}, dict(dropout_p=1.0), ValueError, r"dropout_p must be in \[0, 1\), got 1.0"),
    ("scale-nan", {}, dict(softmax_scale=float("nan")), ValueError, r"softmax_scale must be finite, got nan"),
]


@pytest.mark.parametrize("backend", ["torch", "sdpa", "triton"])
@pytest.mark.parametrize("shapes,kwargs,exc,message", [pytest.param(*c[1:], id=c[0]) for c in BAD_OP_INPUTS])
def test_bad_op_inputs(backend, shapes, kwargs, exc, message):
    q, k, v = qkv(**shapes)
    with pytest.raises(exc, match=message):
        M.attention(q, k, v, backend=backend, **kwargs)


def test_mixed_dtypes_and_unknown_backend():
    q, k, v = qkv()
    with pytest.raises(TypeError, match=r"q, k, v must share one floating dtype, got torch.float32, torch.float16"):
        M.attention(q, k.half(), v, backend="torch")
    with pytest.raises(ValueError, match=r"backend='cuda' is not one of"):
        M.attention(q, k, v, backend="cuda")
    with pytest.raises(TypeError, match=r"must share one floating dtype, got torch.int64"):
        M.attention(q.long(), k.long(), v.long(), backend="torch")


def test_backend_specific_refusals():
    q, k, v = qkv()
    with pytest.raises(NotImplementedError, match="'sdpa' cannot return the log-sum-exp"):
        M.attention(q, k, v, backend="sdpa", return_lse=True)
    with pytest.raises(NotImplementedError, match="'flash' backend .* not implemented yet"):
        M.attention(q, k, v, backend="flash")
    big = torch.randn(1, 4, 1, 264)
    with pytest.raises(ValueError, match=r"supports head dims from 1 to 256, got D=264"):
        M.attention(big, big, big, backend="triton")
    with pytest.raises(TypeError, match=r"backend 'triton' supports .* got torch.float64"):
        M.attention(q.double(), k.double(), v.double(), backend="triton")


@pytest.mark.parametrize("batch, heads", [(65536, 1), (1, 65536)], ids=["65536-sequences", "65536-heads"])
def test_triton_refuses_more_sequences_or_heads_than_a_grid_axis_takes(batch, heads):
    # the kernels' grids are (blocks, heads, batch); CUDA takes at most 65535 on those axes
    x = torch.randn(batch, 1, heads, 8)
    with pytest.raises(ValueError, match=rf"at most 65535 sequences and as many heads .* got B={batch}, H_q={heads}"):
        M.attention(x, x, x, backend="triton")
    if batch > 1:  # packed: the sequences counted from cu_seqlens
        cu = torch.arange(batch + 1, dtype=torch.int32)
        with pytest.raises(ValueError, match=rf"got B={batch}, H_q=1"):
            M.attention_varlen(x[:, 0], x[:, 0], x[:, 0], cu, cu, backend="triton")


def test_triton_second_derivative_raises():
    """The kernels' gradients are not differentiable: asking for a second derivative is an error, not zeros."""
    pytest.importorskip("triton")
    if M.backend_status("triton") is not None:
        pytest.skip(M.backend_status("triton"))
    q, k, v = (t.requires_grad_() for t in qkv())
    dout = torch.randn(B, S, H, D, requires_grad=True)
    out = M.attention(q, k, v, backend="triton", causal=True)
    dq, = torch.autograd.grad(out, [q], dout, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        dq.sum().backward()


def test_triton_without_interpreter_or_gpu_is_explained():
    reason = M.backend_status("triton", "meta")
    assert "not supported" in reason
    assert M.backend_status("torch") is None and "not implemented yet" in M.backend_status("flash")


BAD_SEED_INPUTS = [
    ("width", lambda: (torch.randn(1, 4, 30), torch.randn(1, 4, 30), torch.randn(1, 4, 30), 4, {}),
     ValueError, r"query width 30 is not divisible by n_heads=4"),
    ("kv-width", lambda: (torch.randn(1, 4, 32), torch.randn(1, 4, 16), torch.randn(1, 4, 16), 4, {}),
     ValueError, r"must be \(B=1, S, kv_n_heads\*head_dim=32\)"),
    ("kv-heads", lambda: (torch.randn(1, 4, 32), torch.randn(1, 4, 24), torch.randn(1, 4, 24), 4, {"kv_n_heads": 3}),
     ValueError, r"kv_n_heads=3 must divide n_heads=4"),
    ("cache-batch", lambda: (torch.randn(1, 4, 32), torch.randn(1, 4, 32), torch.randn(1, 4, 32), 4,
                             {"past_key_value": (torch.randn(2, 3, 32), torch.randn(2, 3, 32))}),
     ValueError, r"cached key has shape \(2, 3, 32\)"),
    ("cache-pair", lambda: (torch.randn(1, 4, 32), torch.randn(1, 4, 32), torch.randn(1, 4, 32), 4,
                            {"past_key_value": (torch.randn(1, 3, 32),)}),
     ValueError, r"past_key_value must be \(\) or a \(key, value\) pair"),
    ("mask-int", lambda: (torch.randn(1, 4, 32), torch.randn(1, 4, 32), torch.randn(1, 4, 32), 4,
                          {"key_padding_mask": torch.ones(1, 4, dtype=torch.int64)}),
     ValueError, r"key_padding_mask must be bool"),
]


@pytest.mark.parametrize("impl", ["torch", "sdpa", "triton"])
@pytest.mark.parametrize("make,exc,message", [pytest.param(*c[1:], id=c[0]) for c in BAD_SEED_INPUTS])
def test_bad_seed_function_inputs(impl, make, exc, message):
    fn = {"torch": M.scaled_multihead_dot_product_attention, "sdpa": M.sdpa_attn_fn,
          "triton": M.triton_flash_attn_fn}[impl]
    q, k, v, n_heads, kwargs = make()
    if impl == "torch" and "past_key_value" in kwargs and len(kwargs["past_key_value"]) == 2:
        kwargs["past_key_value"] = (torch.randn(2, 4, 8, 3), torch.randn(2, 4, 3, 8))
        message = r"cached key has shape \(2, 4, 8, 3\)"
    with pytest.raises(exc, match=message):
        fn(q, k, v, n_heads, **kwargs)


def test_torch_cache_in_packed_layout_is_rejected():
    q = torch.randn(1, 1, 32)
    with pytest.raises(ValueError, match=r"attn_impl='torch' caches are \(B, H_kv, D, S\) key"):
        M.scaled_multihead_dot_product_attention(q, q, q, 4,
                                                 past_key_value=(torch.randn(1, 3, 32), torch.randn(1, 3, 32)))


def test_inputs_on_different_devices():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"q, k, v must be on one device, got cpu, meta, cpu"):
        M.attention(q, k.to("meta"), v, backend="torch")
    with pytest.raises(ValueError, match=r"key_padding_mask is on meta but q is on cpu"):
        M.attention(q, k, v, backend="torch", key_padding_mask=torch.ones(B, S, dtype=torch.bool, device="meta"))


def test_error_table_in_docs_lists_every_op_message():
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "errors.md").read_text()
    for row in BAD_OP_INPUTS:
        exc_name = row[3].__name__
        assert f"`{exc_name}`" in doc, row[0]
    for phrase in ["must be a 4-D tensor", "must be a multiple of key/value heads", "must share one floating dtype",
                   "must be bool (B, S_k)", "needs causal=True", "sequence_id needs S_q <= S_k",
                   "broadcastable to (B, H_q, S_q, S_k)", "alibi_slopes must be float", "dropout_p must be in [0, 1)",
                   "softmax_scale must be finite", "cannot return the log-sum-exp", "supports head dims from 1 to 256",
                   "at most 65535 sequences and as many heads",
                   "is expected to broadcast to shape", "cannot return attn weights.", "is an invalid setting."]:
        assert phrase in doc, f"docs/errors.md misses {phrase!r}"


def test_missing_triton_is_explained(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "triton", None)  # makes `import triton` raise ImportError
    assert "cannot import triton" in M.backend_status("triton", "cpu")


@pytest.mark.parametrize("version, runs", [
    pytest.param("3.5.1", False, id="3.5.1"), pytest.param("3.4.0", False, id="3.4.0"),
    pytest.param("3.6.0", True, id="3.6.0"), pytest.param("3.10.0", True, id="3.10.0"),
    pytest.param("3.7.1+git5a3f", True, id="local-build"),
])
def test_triton_older_than_the_kernels_need_is_refused_before_any_launch(monkeypatch, version, runs):
    # Triton 3.5's compiler fails on the backward kernels with ALiBi (benchmarks/NOTES.md session 53): the op must say
    # so up front, not crash inside Triton at the first backward
    triton = pytest.importorskip("triton")
    monkeypatch.setattr(triton, "__version__", version)
    reason = M.backend_status("triton", "meta")  # a device the version check comes before
    if runs:
        assert reason is None or "older than" not in reason
        return
    assert f"Triton {version} is older than the 3.6" in reason
    q = torch.zeros(1, 4, 2, 16)
    with pytest.raises(RuntimeError, match=f"Triton {version} is older than the 3.6"):
        M.attention(q, q, q, backend="triton", causal=True)
