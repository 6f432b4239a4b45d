"""Randomized configurations on the GPU (hypothesis): the triton backend in bfloat16 and float16 against the float64
reference, output and every gradient, at lengths that cross the Hopper kernels' 64- and 128-row blocks.

The CPU fuzz (``test_fuzz.py``) runs the general kernels under the interpreter at S <= 70; the Gluon Hopper kernels
(head dims 64-128, bfloat16/float16) run only here. Each test draws from one family of head dims, so ``pytest -n``
spreads the compiles over workers. Derandomized: every run draws the same examples, so a failure reproduces;
``MPT_ATTENTION_GPU_FUZZ_RANDOM=1`` draws new ones (pytest's ``--hypothesis-seed=N`` draws them again) and
``MPT_ATTENTION_GPU_FUZZ_EXAMPLES`` sets how many per test.
A failure shrinks to a small configuration: add it to ``test_gpu.py`` as a regression case.
"""

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mpt_attention as M
from mpt_attention.testing import (
    AttnCase, assert_close_to_reference, assert_gradients_close_to_reference, make_inputs, make_varlen_inputs,
    reference_attention_varlen,
)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

EXAMPLES = int(os.environ.get("MPT_ATTENTION_GPU_FUZZ_EXAMPLES", "12"))
RANDOM = os.environ.get("MPT_ATTENTION_GPU_FUZZ_RANDOM", "0") == "1"
# head dims by route: the Hopper kernels' tile width 64 and 128 (72-112 padded to 128), the general kernels' beyond
HEAD_DIMS = {"d64": [64], "d72-112": [72, 80, 96, 112], "d128": [128], "general": [32, 48, 160, 256]}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# lengths on either side of the kernels' block edges, and anything up to 600
LENGTHS = st.one_of(st.integers(1, 600), st.sampled_from([63, 64, 65, 127, 128, 129, 191, 255, 256, 257, 383, 513]))


def _settings():
    return settings(max_examples=EXAMPLES, deadline=None, derandomize=not RANDOM, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def _seeded_like(out, seed):
    """dO drawn from the example's seed: a failing example fails again when hypothesis replays it."""
    gen = torch.Generator(device=out.device).manual_seed(seed)
    return torch.randn(out.shape, generator=gen, device=out.device, dtype=out.dtype)


@st.composite
def dense_cases(draw, head_dims):
    causal = draw(st.booleans())
    n_kv = draw(st.sampled_from([1, 2, 4]))
    case = AttnCase(
        batch=draw(st.integers(1, 2)), s_q=draw(LENGTHS), s_k=draw(LENGTHS),
        n_heads=n_kv * draw(st.sampled_from([1, 2, 4])), n_kv=n_kv, head_dim=draw(st.sampled_from(head_dims)),
        causal=causal, alibi=draw(st.booleans()), bias=draw(st.sampled_from([None, None, "vector", "matrix", "full"])),
        padding=draw(st.sampled_from([False, False, "right", "left"])), sequence_id=False,
        prefix=causal and draw(st.integers(0, 4)) == 0,
    )
    case.sequence_id = case.s_q <= case.s_k and draw(st.integers(0, 4)) == 0  # ids exist for key positions only
    soft_mask = case.bias is not None and draw(st.booleans())  # finfo.min entries, as MPT folds padding in
    # a bias in q's dtype takes other routes than a float32 one (the Hopper kernels read a matrix in q's dtype and,
    # for a full-shape one, store its gradient from the dQ warpgroup's ring); SDPA's (B, H, S, D) tensors passed
    # transposed are strided views; the scale is the default, 0, half, twice or 8x the default (the larger ones
    # sharpen the softmax until the backward's delta = rowsum(dO * O), from O rounded to q's dtype as in every
    # flash-style backward, cancels against dP: ``rounded_out`` below allows that, benchmarks/NOTES.md session 60)
    extras = dict(bias_in_q_dtype=case.bias is not None and draw(st.booleans()),
                  heads_major=draw(st.integers(0, 3)) == 0,
                  scale_factor=draw(st.sampled_from([None, None, None, 0.0, 0.5, 2.0, 8.0])))
    return case, draw(st.booleans()), soft_mask, draw(st.integers(0, 2**16)), extras


@st.composite
def varlen_cases(draw, head_dims):
    n_seq = draw(st.integers(1, 4))
    n_kv = draw(st.sampled_from([1, 2]))
    lengths = st.one_of(st.integers(0, 400), st.sampled_from([1, 127, 128, 129, 256]))
    return dict(lens_q=draw(st.lists(lengths, min_size=n_seq, max_size=n_seq)),
                lens_k=draw(st.lists(lengths, min_size=n_seq, max_size=n_seq)),
                n_heads=n_kv * draw(st.sampled_from([1, 2, 4])), n_kv=n_kv, head_dim=draw(st.sampled_from(head_dims)),
                causal=draw(st.booleans()), alibi=draw(st.booleans()), deterministic=draw(st.booleans()),
                seed=draw(st.integers(0, 2**16)))


def _check_dense(drawn, dtype):
    case, deterministic, soft_mask, seed, extras = drawn
    (q, k, v), kw = make_inputs(case, dtype=dtype, device="cuda", requires_grad=True, seed=seed)
    bias = kw.get("attn_bias")
    if extras["bias_in_q_dtype"]:
        kw["attn_bias"] = bias = bias.detach().to(dtype).requires_grad_()
    if soft_mask:
        with torch.no_grad():
            gen = torch.Generator(device="cpu").manual_seed(seed)
            bias.masked_fill_((torch.rand(bias.shape, generator=gen) < 0.3).cuda(), torch.finfo(bias.dtype).min)
    if extras["heads_major"]:  # (B, S, H, D) views of (B, H, S, D) storage
        q, k, v = (x.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_() for x in (q, k, v))
    if extras["scale_factor"] is not None:
        kw["softmax_scale"] = extras["scale_factor"] * case.head_dim**-0.5
    inputs = [q, k, v] + ([bias] if bias is not None else [])
    out = M.attention(q, k, v, backend="triton", deterministic=deterministic, **kw)
    dout = _seeded_like(out, seed)
    grads = torch.autograd.grad(out, inputs, dout)
    try:
        # random examples reach five-key problems, whose low-precision error can be small by chance: the output's
        # rounding, which the backward reads by construction, is allowed for (testing.py)
        assert_gradients_close_to_reference(out, grads, inputs, kw, dout, dtype, rounded_out=True)
    except AssertionError as exc:
        raise AssertionError(f"{case.id()} deterministic={deterministic} soft_mask={soft_mask} seed={seed} "
                             f"{extras}: {exc}") from None


def _check_varlen(c, dtype):
    q, k, v, cu_q, cu_k = make_varlen_inputs(c["lens_q"], c["lens_k"], c["n_heads"], c["n_kv"], c["head_dim"],
                                             dtype=dtype, device="cuda", seed=c["seed"], requires_grad=True)
    kw = dict(causal=c["causal"], alibi_slopes=M.gen_slopes(c["n_heads"], return_1d=True, device="cuda")
              if c["alibi"] else None)
    out = M.attention_varlen(q, k, v, cu_q, cu_k, backend="triton", deterministic=c["deterministic"], **kw)
    if not out.numel():
        return
    dout = _seeded_like(out, c["seed"])
    grads = torch.autograd.grad(out, (q, k, v), dout, allow_unused=True)

    def reference(compute_dtype):
        xs = [x.detach().to(compute_dtype).requires_grad_() for x in (q, k, v)]
        ref, _ = reference_attention_varlen(*xs, cu_q, cu_k, compute_dtype=compute_dtype, **kw)
        return ref, torch.autograd.grad(ref, xs, dout.to(compute_dtype), allow_unused=True)

    ref, ref_grads = reference(torch.float64)
    low, low_grads = reference(dtype)
    assert_close_to_reference(f"varlen {c} out", out, ref, low)
    for name, g, r, lo, x in zip(["dq", "dk", "dv"], grads, ref_grads, low_grads, (q, k, v)):
        zeros = torch.zeros_like(x)
        assert_close_to_reference(f"varlen {c} {name}", zeros if g is None else g,
                                  zeros.double() if r is None else r, zeros if lo is None else lo)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dims", HEAD_DIMS)
def test_gpu_fuzz_padded_batches(dims, dtype):
    """Batches with ALiBi, every bias shape in float32 or q's dtype (some soft-masked), key padding, packed
    ``sequence_id``, prefix-LM, MHA/GQA/MQA, causal or not, reproducible or not, heads-major strides, the default
    softmax scale, 0, or half, twice or 8x the default."""
    @_settings()
    @given(dense_cases(HEAD_DIMS[dims]))
    def run(drawn):
        _check_dense(drawn, DTYPES[dtype])

    run()


@pytest.mark.parametrize("dims", ["d64", "d72-112", "d128"])
def test_gpu_fuzz_packed_sequences(dims):
    """``attention_varlen`` over packed sequences of 0-400 tokens, bfloat16."""
    @_settings()
    @given(varlen_cases(HEAD_DIMS[dims]))
    def run(drawn):
        _check_varlen(drawn, torch.bfloat16)

    run()
