"""The attention layers: checkpoint layout, peers (torch.nn.MultiheadAttention, HF MptAttention), options."""

import pytest
import torch

import mpt_attention as M

IMPLS = ["torch", "sdpa", "triton"]


def test_parameter_names_and_shapes():
    d, h = 64, 4
    mha = M.MultiheadAttention(d, h, attn_impl="torch", qk_ln=True)
    mqa = M.MultiQueryAttention(d, h, attn_impl="torch", qk_ln=True)
    gqa = M.GroupedQueryAttention(d, h, 2, attn_impl="torch", qk_ln=True)
    hd = d // h
    shapes = lambda m: {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes(mha) == {"Wqkv.weight": (3 * d, d), "Wqkv.bias": (3 * d,), "q_ln.weight": (d,), "q_ln.bias": (d,),
                           "k_ln.weight": (d,), "k_ln.bias": (d,), "out_proj.weight": (d, d), "out_proj.bias": (d,)}
    assert shapes(mqa)["Wqkv.weight"] == (d + 2 * hd, d) and shapes(mqa)["k_ln.weight"] == (hd,)
    assert shapes(gqa)["Wqkv.weight"] == (d + 4 * hd, d) and shapes(gqa)["k_ln.weight"] == (2 * hd,)
    assert mha.Wqkv._fused == (0, (d, 2 * d)) and mqa.Wqkv._fused == (0, (d, d + hd))
    assert mha.out_proj._is_residual
    assert set(M.MultiheadAttention(d, h, bias=False).state_dict()) == {"Wqkv.weight", "out_proj.weight"}


def test_registry():
    assert M.ATTN_CLASS_REGISTRY["multihead_attention"] is M.MultiheadAttention
    assert M.ATTN_CLASS_REGISTRY["multiquery_attention"] is M.MultiQueryAttention
    assert M.ATTN_CLASS_REGISTRY["grouped_query_attention"] is M.GroupedQueryAttention


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(d_model=30, n_heads=4, kv_n_heads=4), "d_model must be divisible by n_heads"),
        (dict(d_model=64, n_heads=16, kv_n_heads=0), "kv_n_heads should be greater than zero."),
        (dict(d_model=64, n_heads=16, kv_n_heads=17),
         "The number of KV heads should be less than or equal to Q heads."),
        (dict(d_model=64, n_heads=16, kv_n_heads=3), "n_heads must be divisible by kv_n_heads"),
        (dict(d_model=64, n_heads=4, kv_n_heads=4, attn_impl="cuda"), r"attn_impl='cuda' is an invalid setting\."),
        (dict(d_model=64, n_heads=4, kv_n_heads=4, attn_pdrop=1.5), r"attn_pdrop must be in \[0, 1\), got 1.5"),
    ],
    ids=["d_model", "kv0", "kv17", "kv3", "impl", "pdrop"],
)
def test_constructor_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        M.GroupedQueryAttention(**kwargs)


def test_matches_torch_nn_multihead_attention():
    """Pins the Wqkv row order (q; k; v) and the head-major layout (seed test T2, CPU float32)."""
    torch.manual_seed(17)
    d, h, s = 64, 2, 16
    ours = M.MultiheadAttention(d, h, attn_impl="torch")
    theirs = torch.nn.MultiheadAttention(d, h, bias=True, batch_first=True)
    theirs.in_proj_weight.data.copy_(ours.Wqkv.weight)
    theirs.in_proj_bias.data.copy_(ours.Wqkv.bias)
    theirs.out_proj.weight.data.copy_(ours.out_proj.weight)
    theirs.out_proj.bias.data.copy_(ours.out_proj.bias)
    x = torch.randn(2, s, d, requires_grad=True)
    y, _, _ = ours(x, attention_mask=torch.ones(2, s, dtype=torch.bool), is_causal=True)
    causal = torch.triu(torch.full((s, s), float("-inf")), 1)
    x2 = x.detach().clone().requires_grad_()
    y2, _ = theirs(x2, x2, x2, attn_mask=causal, need_weights=False)
    torch.testing.assert_close(y, y2, rtol=1e-5, atol=1e-5)
    y.sum().backward()
    y2.sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.Wqkv.weight.grad, theirs.in_proj_weight.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cls,extra", [(M.MultiheadAttention, {}), (M.MultiQueryAttention, {}),
                                       (M.GroupedQueryAttention, {"kv_n_heads": 2})], ids=["mha", "mqa", "gqa"])
@pytest.mark.parametrize("clip_qkv", [None, 0.5], ids=["noclip", "clip"])
@pytest.mark.parametrize("qk_ln", [False, True], ids=["noln", "qkln"])
def test_state_dicts_move_across_backends(cls, extra, clip_qkv, qk_ln):
    """Seed test T1 on CPU: build one module per backend from one state dict; outputs and grads agree."""
    torch.manual_seed(7)
    d, h, s = 64, 4, 19
    x = torch.randn(2, s, d)
    bias = M.build_attn_bias("torch", torch.zeros(1, h, 1, s), h, s, causal=True, alibi=True)
    results = []
    state = None
    for impl in IMPLS:
        module = cls(d, h, attn_impl=impl, clip_qkv=clip_qkv, qk_ln=qk_ln, **extra)
        if state is None:
            state = module.state_dict()
        module.load_state_dict(state)
        xi = x.clone().requires_grad_()
        y, _, _ = module(xi, attn_bias=bias, attention_mask=torch.ones(2, s, dtype=torch.bool), is_causal=True)
        y.sum().backward()
        results.append((y, xi.grad, module.Wqkv.weight.grad))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_alibi_flag_equals_passing_mpts_bias(impl, causal):
    torch.manual_seed(3)
    d, h, s, max_len = 48, 6, 13, 32
    with_flag = M.MultiheadAttention(d, h, attn_impl=impl, alibi=True)
    plain = M.MultiheadAttention(d, h, attn_impl=impl)
    plain.load_state_dict(with_flag.state_dict())
    x = torch.randn(2, s, d)
    bias = M.build_alibi_bias(h, max_len, full=not causal)
    a, _, _ = with_flag(x, is_causal=causal)
    b, _, _ = plain(x, attn_bias=bias, is_causal=causal)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def _hf_setup(impl, d=48, h=4, max_len=64):
    """HF's MptAttention and ours (``attn_impl=impl``) holding the same weights, both in eval."""
    mpt = pytest.importorskip("transformers.models.mpt.modeling_mpt")
    from transformers import MptConfig

    config = MptConfig(d_model=d, n_heads=h, n_layers=1, max_seq_len=max_len)
    theirs = mpt.MptAttention(config, layer_idx=0).eval()
    ours = M.MultiheadAttention(d, h, attn_impl=impl, alibi=True, bias=False).eval()
    ours.load_state_dict(theirs.state_dict())
    return mpt, config, theirs, ours


@pytest.mark.parametrize("impl", IMPLS)
def test_matches_hf_mpt_attention_with_padding(impl):
    torch.manual_seed(5)
    mpt, config, theirs, ours = _hf_setup(impl)
    b, s = 3, 11
    x = torch.randn(b, s, 48)
    keep = torch.ones(b, s, dtype=torch.bool)
    keep[1, 8:] = False  # right padding
    keep[2, :3] = False  # left padding
    masked = torch.triu(torch.ones(s, s, dtype=torch.bool), 1).view(1, 1, s, s) | ~keep.view(b, 1, 1, s)
    position_bias = mpt.build_mpt_alibi_tensor(4, config.max_seq_len)
    with torch.no_grad():
        expected, _ = theirs(x, position_bias, attention_mask=masked)
        got, _, _ = ours(x, attention_mask=keep, is_causal=True)
    live = ~masked.all(-1).view(b, s)  # rows with no key are defined differently (documented)
    torch.testing.assert_close(got[live], expected[live], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_matches_hf_mpt_attention_with_cache(impl):
    torch.manual_seed(6)
    mpt, config, theirs, ours = _hf_setup(impl)
    from transformers import DynamicCache

    b, n, total = 2, 6, 9
    x = torch.randn(b, total, 48)
    position_bias = mpt.build_mpt_alibi_tensor(4, config.max_seq_len)
    cache = DynamicCache(config=config)
    hf_steps, our_steps = [], []
    past = ()
    with torch.no_grad():
        for start, stop in [(0, n)] + [(t, t + 1) for t in range(n, total)]:
            s_q = stop - start
            masked = torch.triu(torch.ones(s_q, stop, dtype=torch.bool), stop - s_q + 1).view(1, 1, s_q, stop)
            out, _ = theirs(x[:, start:stop], position_bias, cache=cache, attention_mask=masked)
            hf_steps.append(out)
            out, _, past = ours(x[:, start:stop], past_key_value=past, is_causal=True)
            our_steps.append(out)
    torch.testing.assert_close(torch.cat(our_steps, 1), torch.cat(hf_steps, 1), rtol=1e-5, atol=1e-5)
    if impl == "torch":
        assert past[0].shape == (b, 4, 12, total)  # torch keeps the transposed key
    else:
        assert past[0].shape == past[1].shape == (b, total, 48)  # packed


def test_qk_ln_widths_and_clip():
    torch.manual_seed(0)
    gqa = M.GroupedQueryAttention(64, 8, 2, attn_impl="torch", qk_ln=True, clip_qkv=0.25)
    calls = {}
    gqa.q_ln.register_forward_hook(lambda m, i, o: calls.__setitem__("q", i[0]))
    gqa.k_ln.register_forward_hook(lambda m, i, o: calls.__setitem__("k", i[0]))
    gqa(torch.randn(1, 5, 64) * 10)
    assert calls["q"].shape[-1] == 64 and calls["k"].shape[-1] == 16
    assert calls["q"].abs().max() <= 0.25 and calls["k"].abs().max() <= 0.25


def test_low_precision_layernorm_runs_in_the_autocast_dtype():
    norm = M.LPLayerNorm(16)
    x = torch.randn(2, 16)
    torch.testing.assert_close(norm(x), torch.nn.functional.layer_norm(x, (16,), norm.weight, norm.bias))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert norm(x).dtype == torch.bfloat16
    module = M.MultiheadAttention(32, 4, attn_impl="torch", qk_ln=True, low_precision_layernorm=True)
    assert isinstance(module.q_ln, M.LPLayerNorm)


def test_verbose_warnings():
    with pytest.warns(UserWarning, match="While `attn_impl: triton` can be faster"):
        M.MultiheadAttention(32, 4, attn_impl="triton", verbose=1)


def test_flash_module_builds_and_its_forward_says_it_is_missing():
    module = M.MultiheadAttention(32, 4, attn_impl="flash")
    with pytest.raises(NotImplementedError, match="not implemented yet"):
        module(torch.randn(1, 3, 32))


@pytest.mark.parametrize("impl", IMPLS)
def test_attention_dropout_only_in_training(impl):
    module = M.MultiheadAttention(32, 4, attn_impl=impl, attn_pdrop=0.5)
    x = torch.randn(1, 8, 32)
    module.eval()
    a, _, _ = module(x)
    b, _, _ = module(x)
    assert torch.equal(a, b)
    module.train()
    c, _, _ = module(x)
    assert not torch.allclose(a, c)
