"""Randomized configurations: every backend against the float64 reference (hypothesis).

CI runs a small sample; ``pytest -m nightly`` runs 1000 examples per backend. A failure shrinks to a
minimal configuration: add it to ``tests/test_attention.py`` as a regression case.
"""

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mpt_attention as M
from mpt_attention.testing import (
    AttnCase, assert_close_to_reference, make_inputs, make_varlen_inputs, reference_attention,
    reference_attention_varlen,
)


@st.composite
def cases(draw):
    causal = draw(st.booleans())
    n_kv = draw(st.sampled_from([1, 2]))
    case = AttnCase(
        batch=draw(st.integers(1, 3)),
        s_q=draw(st.integers(1, 70)),
        s_k=draw(st.integers(1, 70)),
        n_heads=n_kv * draw(st.sampled_from([1, 2, 3])),
        n_kv=n_kv,
        head_dim=draw(st.sampled_from([8, 16, 24, 40])),
        causal=causal,
        alibi=draw(st.booleans()),
        bias=draw(st.sampled_from([None, "vector", "matrix", "full"])),
        padding=draw(st.sampled_from([False, "right", "left"])),
        sequence_id=False,
        prefix=causal and draw(st.booleans()),
    )
    case.sequence_id = case.s_q <= case.s_k and draw(st.booleans())  # ids exist for key positions only
    return case, draw(st.integers(0, 2**16))


def _backend(name):
    """'triton-atomic-dq' is the triton backend with deterministic=False (dQ through atomics)."""
    return ("triton", dict(deterministic=False)) if name == "triton-atomic-dq" else (name, {})


def _check(backend, case, seed, with_grads):
    backend, extra = _backend(backend)
    (q, k, v), kw = make_inputs(case, requires_grad=with_grads, seed=seed)
    bias = kw.get("attn_bias")
    if bias is not None and seed % 3 == 0:  # a third of the biases also mask, as MPT folds padding in
        with torch.no_grad():
            soft = torch.rand(bias.shape, generator=torch.Generator().manual_seed(seed)) < 0.3
            bias.masked_fill_(soft, torch.finfo(torch.float32).min)
    inputs = [q, k, v] + ([bias] if bias is not None else [])
    out = M.attention(q, k, v, backend=backend, **kw, **extra)
    ref_in = [x.detach().double().requires_grad_(with_grads) for x in inputs]
    ref, _ = reference_attention(*ref_in[:3], **{**kw, "attn_bias": ref_in[3] if bias is not None else None})
    low, _ = reference_attention(q.detach(), k.detach(), v.detach(), compute_dtype=torch.float32,
                                 **{**kw, "attn_bias": bias.detach() if bias is not None else None})
    assert_close_to_reference(f"{case.id()} out", out, ref, low)
    if with_grads:
        dout = torch.randn_like(out)
        grads = torch.autograd.grad(out, inputs, dout)
        ref_grads = torch.autograd.grad(ref, ref_in, dout.double())
        for name, g, r in zip(["dq", "dk", "dv", "dbias"], grads, ref_grads):
            assert_close_to_reference(f"{case.id()} {name}", g, r, r.float(), floor=1e-4)


def _settings(examples, derandomize=True):
    return settings(max_examples=examples, deadline=None, derandomize=derandomize,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


CI_EXAMPLES = int(os.environ.get("MPT_ATTENTION_FUZZ_EXAMPLES", "30"))


def _fuzz(strategy, check, backend, examples, derandomize, with_grads):
    @_settings(examples, derandomize=derandomize)
    @given(strategy)
    def run(drawn):
        check(backend, drawn, with_grads)

    run()


def _check_case(backend, drawn, with_grads):
    case, seed = drawn
    _check(backend, case, seed, with_grads)


BACKENDS = ["torch", "sdpa", "triton", "triton-atomic-dq"]


@st.composite
def varlen_cases(draw):
    n_seq = draw(st.integers(1, 4))
    n_kv = draw(st.sampled_from([1, 2]))
    return dict(
        lens_q=draw(st.lists(st.integers(0, 50), min_size=n_seq, max_size=n_seq)),
        lens_k=draw(st.lists(st.integers(0, 50), min_size=n_seq, max_size=n_seq)),
        n_heads=n_kv * draw(st.sampled_from([1, 2, 3])), n_kv=n_kv,
        head_dim=draw(st.sampled_from([8, 16, 24, 40])),
        causal=draw(st.booleans()), alibi=draw(st.sampled_from([None, "heads", "per-sequence"])),
        seed=draw(st.integers(0, 2**16)),
    )


def _check_varlen(backend, c, with_grads):
    backend, extra = _backend(backend)
    q, k, v, cu_q, cu_k = make_varlen_inputs(c["lens_q"], c["lens_k"], c["n_heads"], c["n_kv"], c["head_dim"],
                                             seed=c["seed"], requires_grad=with_grads)
    slopes = None
    if c["alibi"]:
        slopes = M.gen_slopes(c["n_heads"], return_1d=True)
        if c["alibi"] == "per-sequence":
            slopes = slopes.view(1, -1) * torch.linspace(0.5, 2.0, len(c["lens_q"])).view(-1, 1)
    out = M.attention_varlen(q, k, v, cu_q, cu_k, backend=backend, causal=c["causal"], alibi_slopes=slopes, **extra)
    ref_in = [x.detach().double().requires_grad_(with_grads) for x in (q, k, v)]
    ref, _ = reference_attention_varlen(*ref_in, cu_q, cu_k, causal=c["causal"], alibi_slopes=slopes)
    low, _ = reference_attention_varlen(q.detach(), k.detach(), v.detach(), cu_q, cu_k, causal=c["causal"],
                                        alibi_slopes=slopes, compute_dtype=torch.float32)
    assert_close_to_reference(f"varlen {c} out", out, ref, low)
    if with_grads and out.numel():
        dout = torch.randn_like(out)
        grads = torch.autograd.grad(out, (q, k, v), dout, allow_unused=True)
        ref_grads = torch.autograd.grad(ref, ref_in, dout.double(), allow_unused=True)
        for name, g, r, x in zip(["dq", "dk", "dv"], grads, ref_grads, (q, k, v)):
            g = torch.zeros_like(x) if g is None else g
            r = torch.zeros_like(x, dtype=torch.float64) if r is None else r
            assert_close_to_reference(f"varlen {c} {name}", g, r, r.float(), floor=1e-4)


# (strategy, checker): padded-batch attention and packed varlen sequences
STRATEGIES = {"dense": (cases, _check_case), "varlen": (varlen_cases, _check_varlen)}


@pytest.mark.parametrize("kind", STRATEGIES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_fuzz_ci_sample(backend, kind):
    strategy, check = STRATEGIES[kind]
    _fuzz(strategy(), check, backend, CI_EXAMPLES, True, with_grads=True)


@pytest.mark.nightly
@pytest.mark.parametrize("kind", STRATEGIES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_fuzz_nightly(backend, kind):
    strategy, check = STRATEGIES[kind]
    _fuzz(strategy(), check, backend, 1000, False, with_grads=backend != "sdpa")
