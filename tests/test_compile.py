"""The Triton op behind torch.library: schema/fake checks and torch.compile(fullgraph=True)."""

import pytest
import torch

import mpt_attention as M
from mpt_attention.testing import AttnCase, assert_compiled_matches_eager, make_inputs


def test_opcheck_forward_op():
    (q, k, v), kw = make_inputs(AttnCase(1, 17, 17, 2, 1, 16, causal=True, alibi=True, bias="vector"),
                                requires_grad=True)
    args = (q, k, v, kw["attn_bias"], kw["alibi_slopes"], None, None, None, None, 0.25, True, 0.0, None, None, 0, 0,
            None, None, True)
    torch.library.opcheck(torch.ops.mpt_attention.triton_fwd.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


@pytest.mark.parametrize("backend", ["torch", "sdpa", "triton"])
@pytest.mark.parametrize("case", [AttnCase(1, 23, 23, 2, 1, 16, causal=True, alibi=True, padding=True),
                                  AttnCase(2, 16, 16, 2, 2, 16, bias="vector")], ids=lambda c: c.id())
def test_compile_fullgraph_forward_and_backward(case, backend):
    (q, k, v), kw = make_inputs(case, requires_grad=True)
    M.attention(q, k, v, backend=backend, **kw)  # eager once: inputs are valid

    def step(q, k, v):
        if backend == "sdpa":  # no log-sum-exp from SDPA
            return M.attention(q, k, v, backend=backend, **kw) * 2.0, q.new_zeros(())
        out, lse = M.attention(q, k, v, backend=backend, return_lse=True, **kw)
        # the summed first output carries the LSE too, so its gradient takes the same path in both modes
        return out * 2.0 + 0.5 * lse.transpose(1, 2)[..., None], lse

    assert_compiled_matches_eager(step, [q, k, v])


@pytest.mark.parametrize("layout", ["bshd", "bhsd-transposed", "head-dim-strided"])
def test_opcheck_backward_op(layout):
    """The backward op's fake kernel gives its gradients the real kernel's shapes and strides: the inputs' own
    (e.g. for (B, H, S, D) tensors passed transposed) where D is innermost, and a contiguous bias gradient."""
    (q, k, v), kw = make_inputs(AttnCase(1, 17, 17, 2, 1, 16, causal=True, alibi=True))
    if layout == "bhsd-transposed":
        q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
    elif layout == "head-dim-strided":  # dense, but D is not the innermost dim: the kernels get a copy
        q, k, v = (x.transpose(2, 3).contiguous().transpose(2, 3) for x in (q, k, v))
    # a bias matrix with its gradient, laid out transposed: the gradient comes back contiguous
    bias = torch.randn(1, 2, 17, 17).transpose(2, 3)
    out, lse = torch.ops.mpt_attention.triton_fwd(q, k, v, bias, kw["alibi_slopes"], None, None, None, None, 0.25,
                                                  True, 0.0, None, None, 0, 0, None, None, True)
    args = (torch.randn_like(out), q, k, v, out, lse, None, bias, kw["alibi_slopes"], None, None, None, None, 0.25,
            True, 0.0, True, None, None, 0, 0, True, None, None)
    torch.library.opcheck(torch.ops.mpt_attention.triton_bwd.default, args,
                          test_utils=("test_schema", "test_faketensor"))


def test_compile_fullgraph_with_transposed_inputs():
    """(B, H, S, D) tensors passed transposed: the fake kernels give the gradients the strides the real ones
    do (the inputs' own), so the compiled backward reads them right."""
    (q, k, v), kw = make_inputs(AttnCase(1, 23, 23, 2, 1, 16, causal=True, alibi=True))
    q, k, v = (x.transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))

    def step(q, k, v):
        out = M.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), backend="triton", **kw)
        return out.transpose(1, 2) * 2.0

    assert_compiled_matches_eager(step, [q, k, v])


def test_compile_fullgraph_with_atomic_dq():
    (q, k, v), kw = make_inputs(AttnCase(1, 23, 23, 2, 1, 16, causal=True, alibi=True), requires_grad=True)
    M.attention(q, k, v, backend="triton", deterministic=False, **kw)

    def step(q, k, v):
        return M.attention(q, k, v, backend="triton", deterministic=False, **kw) * 2.0

    assert_compiled_matches_eager(step, [q, k, v])
