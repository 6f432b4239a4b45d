"""The Triton op behind torch.library: schema/fake checks and torch.compile(fullgraph=True)."""

import pytest
import torch

import mpt_attention as M
from mpt_attention.testing import AttnCase, assert_compiled_matches_eager, make_inputs


def test_opcheck_forward_op():
    (q, k, v), kw = make_inputs(AttnCase(1, 17, 17, 2, 1, 16, causal=True, alibi=True, bias="vector"),
                                requires_grad=True)
    args = (q, k, v, kw["attn_bias"], kw["alibi_slopes"], None, None, None, None, 0.25, True, 0.0, None, None, 0, 0, True)
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


def test_compile_fullgraph_with_atomic_dq():
    (q, k, v), kw = make_inputs(AttnCase(1, 23, 23, 2, 1, 16, causal=True, alibi=True), requires_grad=True)
    M.attention(q, k, v, backend="triton", deterministic=False, **kw)

    def step(q, k, v):
        return M.attention(q, k, v, backend="triton", deterministic=False, **kw) * 2.0

    assert_compiled_matches_eager(step, [q, k, v])
