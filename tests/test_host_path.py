"""The host side of a training step, checked without a GPU: the copy-engine descriptors the Hopper launches
build without TensorDescriptor's own checks (hopper_views.descriptor) would pass them, the buffers the backward
leaves to its kernels to zero, and the key descriptors kept from one-key launches. The lean launcher has its own
file (tests/test_lean_launch.py); the kernels themselves run in tests/test_gpu_hopper.py."""

import pytest
import torch

pytest.importorskip("triton")
from mpt_attention.impl.triton import hopper, hopper_dkdv, launch, launch_backward, lean_launch, plans  # noqa: E402

if hopper._IMPORT_ERROR is None:
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor


@pytest.fixture
def hopper_launches(monkeypatch, hopper_route_on_cpu):
    """The Hopper kernels' launches during the test as ``(kernel name, args)``, not run (no GPU here); the
    route to them forced for CPU tensors. The delta kernel before the backward's still runs (in the interpreter)."""
    calls = []
    real = lean_launch.launch_kernel

    def launch_kernel(fn, grid, *args, **kwargs):
        if not fn.__name__.startswith("_hopper"):
            return real(fn, grid, *args, **kwargs)
        calls.append((fn.__name__, args))
        return None

    monkeypatch.setattr(lean_launch, "launch_kernel", launch_kernel)
    return calls


@pytest.fixture
def row_terms_calls(monkeypatch):
    """One ``(delta, dq_zero, dq_sync)`` entry per call of ``plans.row_terms`` (the delta kernel's launch) during the
    test: the delta buffer it fills, the dQ sums it zeroes, or the block words it zeroes instead; each call still
    runs."""
    calls, real = [], plans.row_terms

    def record(*args, **kwargs):
        calls.append((args[4], *args[8:]))
        return real(*args, **kwargs)

    monkeypatch.setattr(plans, "row_terms", record)
    return calls


def _layouts(d, h, h_kv, layout):
    if layout == "packed-qkv":  # the seed's (B, S, 3 * H * D) projection, heads adjacent
        qkv = torch.randn(2, 128, 3 * h * d, dtype=torch.bfloat16)
        return [t.unflatten(-1, (h, d)) for t in qkv.chunk(3, dim=-1)]
    q, k, v = (torch.randn(2, 128, n, d, dtype=torch.bfloat16) for n in (h, h_kv, h_kv))
    if layout == "bhsd":  # SDPA's (B, H, S, D) tensors passed transposed
        q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    return q, k, v


def _storage_elements(t: torch.Tensor) -> int:
    return t.untyped_storage().nbytes() // t.element_size() - t.storage_offset()


@pytest.mark.skipif(hopper._IMPORT_ERROR is not None, reason="Gluon unavailable")
@pytest.mark.parametrize("d, h, h_kv, layout, bias", [
    pytest.param(128, 4, 4, "dense", None, id="d128"),
    pytest.param(64, 4, 2, "bhsd", None, id="d64-gqa-bhsd"),
    pytest.param(80, 4, 4, "packed-qkv", None, id="d80-packed-qkv"),
    pytest.param(112, 4, 1, "dense", "row", id="d112-mqa-bias-row"),
    pytest.param(128, 4, 4, "dense", "matrix", id="d128-bias-matrix-with-grad"),
    pytest.param(64, 4, 2, "dense", "matrix-broadcast", id="d64-gqa-bias-matrix-over-heads"),
])
def test_every_descriptor_a_step_builds_passes_the_constructors_checks(hopper_launches, d, h, h_kv, layout, bias):
    """A forward and a backward with the dQ warpgroup through the Hopper launches: each copy-engine descriptor
    (built without TensorDescriptor's checks) passes them when rebuilt through the constructor, equals the
    rebuilt one, and spans no element past its tensor's storage."""
    q, k, v = _layouts(d, h, h_kv, layout)
    slopes = torch.rand(h) if bias is None else None
    bias_t = None
    if bias == "row":
        bias_t = torch.randn(1, h, 1, 128)
    elif bias is not None:
        bias_t = torch.randn(2, h if bias == "matrix" else 1, 128, 128, dtype=torch.bfloat16).requires_grad_(
            bias == "matrix")
    out, lse = launch.forward(q, k, v, bias_t, slopes, None, None, None, None, d**-0.5, True, 0.0)
    out.copy_(torch.randn_like(out))  # the launch did not run: give the delta kernel finite rows
    lse.copy_(torch.randn_like(lse))
    bias_grad = bias_t is not None and bias_t.requires_grad
    launch_backward.backward(torch.randn_like(out), q, k, v, out, lse, None, bias_t, slopes, None, None, None, None,
                             d**-0.5, True, 0.0, bias_grad, deterministic=None)
    assert [name for name, _ in hopper_launches] == ["_hopper_fwd_kernel", "_hopper_bwd_dkdv_kernel"]
    descriptors = [a for _, args in hopper_launches for a in args if isinstance(a, TensorDescriptor)]
    matrix = bias is not None and bias.startswith("matrix")
    # forward: q, k, v, out and a bias; backward: k, v, q, dO, dK, dV, dQ sums, row terms, dO's scaled blocks (a
    # bias, where the loader picks dO's source per block), a bias matrix, dbias
    scaled_blocks = bias is not None and hopper_dkdv.scaled_dout_blocks(d, matrix)
    assert len(descriptors) == 4 + (bias is not None) + 8 + scaled_blocks + matrix + bias_grad
    for desc in descriptors:
        checked = TensorDescriptor(desc.base, desc.shape, desc.strides, desc.block_shape, desc.layout)
        assert desc == checked
        assert sum((n - 1) * st for n, st in zip(desc.shape, desc.strides)) < _storage_elements(desc.base)


def test_the_backward_with_the_dq_warpgroup_zeroes_dq_in_the_delta_kernel(hopper_launches, monkeypatch,
                                                                          row_terms_calls):
    """The float32 dQ sums start as zeros written by the delta kernel (no fill kernel of their own), and no
    (B, H, S_q) delta is allocated: the dQ warpgroup reads it from the row terms."""
    q, k, v = _layouts(64, 4, 4, "dense")
    out, lse, dout = torch.randn_like(q), torch.randn(2, 4, 128), torch.randn_like(q)
    zero_fills, real_zeros_like = [], torch.zeros_like
    monkeypatch.setattr(torch, "zeros_like", lambda *a, **kw: (zero_fills.append(1), real_zeros_like(*a, **kw))[1])
    launch_backward.backward(dout, q, k, v, out, lse, None, None, torch.rand(4), None, None, None, None, 0.1, True,
                             0.0, False, deterministic=None)
    (delta, dq_acc, _), = row_terms_calls
    assert delta is None and not zero_fills
    assert dq_acc.dtype == torch.float32 and dq_acc.shape == q.shape and dq_acc.stride() == q.stride()
    assert torch.equal(dq_acc, torch.zeros_like(dq_acc))  # NaN-poisoned when allocated (conftest)
    args = dict(hopper_launches)["_hopper_bwd_dkdv_kernel"]
    assert any(isinstance(a, TensorDescriptor) and a.base is dq_acc for a in args)


@pytest.mark.skipif(hopper._IMPORT_ERROR is not None, reason="Gluon unavailable")
@pytest.mark.parametrize("s_q, s_k, causal", [
    pytest.param(128, 128, True, id="causal"),
    pytest.param(200, 64, False, id="non-causal-more-queries"),
])
def test_the_first_write_backward_zeroes_no_dq_sums_but_the_block_words(hopper_launches, row_terms_calls, s_q, s_k,
                                                                         causal):
    """Where the consumers form dQ (D128), each 64-query block's first program stores into the dQ sums: the delta
    kernel writes no zeros there but zeros each block's int32 word, which the dK/dV launch gets beside the sums."""
    q = torch.randn(2, s_q, 4, 128, dtype=torch.bfloat16)
    k, v = (torch.randn(2, s_k, 4, 128, dtype=torch.bfloat16) for _ in range(2))
    out, lse, dout = torch.randn_like(q), torch.randn(2, 4, s_q), torch.randn_like(q)
    launch_backward.backward(dout, q, k, v, out, lse, None, None, torch.rand(4), None, None, None, None, 0.1, causal,
                             0.0, False, deterministic=None)
    (_, dq_zero, dq_sync), = row_terms_calls
    assert dq_zero is None
    assert dq_sync.shape == (2, 4, -(-s_q // 64)) and dq_sync.dtype == torch.int32
    assert torch.equal(dq_sync, torch.zeros_like(dq_sync))  # poisoned when allocated (conftest)
    args = dict(hopper_launches)["_hopper_bwd_dkdv_kernel"]
    assert any(a is dq_sync for a in args)
    dq_acc = next(a.base for a in args if isinstance(a, TensorDescriptor) and a.base.dtype == torch.float32
                  and a.base.shape == q.shape)
    assert dq_acc.isnan().all()  # NaN-poisoned, unwritten: the kernel's first programs write it


@pytest.mark.skipif(hopper._IMPORT_ERROR is not None, reason="Gluon unavailable")
@pytest.mark.parametrize("row", [pytest.param(False, id="slopes"), pytest.param(True, id="bias-row")])
def test_first_write_dq_takes_causal_alibis_reach(hopper_launches, monkeypatch, row_terms_calls, row):
    """Past causal ALiBi's reach, from slopes or from a bias row's table, each 64-query block is still visited by
    some key block (its diagonal's, or the one holding the row's largest term up to it: tests/test_reach.py), so the
    dK/dV launch stores the dQ sums' first parts (``FIRST_WRITE``) and skips (``REACH``): nothing zeroes the sums."""
    from mpt_attention.impl.triton import reach

    monkeypatch.setattr(hopper, "REACH_MIN_KEYS", 256)  # (a training step's from 128 keys)
    made, real_plan = [], hopper_dkdv.dkdv_plan
    monkeypatch.setattr(hopper_dkdv, "dkdv_plan", lambda *args: made.append((args, real_plan(*args))) or made[-1][1])
    q, k, v = (torch.randn(2, 128, 4, 128, dtype=torch.bfloat16) for _ in range(3))
    out, lse, dout = torch.randn_like(q), torch.randn(2, 4, 128), torch.randn_like(q)
    slopes = torch.rand(4) + 0.1
    bias = (slopes.view(1, 4, 1, 1) * (torch.arange(128.0) - 127)).to(q.dtype) if row else None
    launch_backward.backward(dout, q, k, v, out, lse, None, bias, None if row else slopes, None, None, None, None,
                             0.1, True, 0.0, False, deterministic=None)
    (_, dq_zero, dq_sync), = row_terms_calls
    (args, plan), = made
    assert plan.launch.kwargs["REACH"] == (reach.REACH_ROW if row else reach.REACH_SLOPES)
    assert plan.launch.kwargs["FIRST_WRITE"] and args[16] is True  # (first_write, as plans.run_fused passes it)
    assert dq_zero is None and torch.equal(dq_sync, torch.zeros_like(dq_sync))  # poisoned when allocated (conftest)


@pytest.mark.skipif(hopper._IMPORT_ERROR is not None, reason="Gluon unavailable")
@pytest.mark.parametrize("head_dim, n_heads, n_kv, reach_keys, pdl, expected", [
    pytest.param(128, 4, 4, None, True, True, id="consumers-form-dq"),
    pytest.param(64, 4, 4, None, True, True, id="dq-warpgroup"),
    pytest.param(128, 4, 4, 256, True, False, id="reach-norms-launched-between"),
    pytest.param(128, 8, 2, None, True, False, id="grouped-heads-partial-sums-allocated-after"),
    pytest.param(128, 4, 4, None, False, False, id="switched-off"),
])
def test_dkdv_launch_is_the_delta_kernels_programmatic_dependent_where_safe(hopper_launches, monkeypatch, head_dim,
                                                                            n_heads, n_kv, reach_keys, pdl, expected):
    """``hopper.PDL``: the dK/dV kernel may start before the delta kernel has finished (it waits for the row terms
    in-kernel), only where nothing is launched between the two and it writes no buffer allocated after the delta
    launch; the delta kernel then lets it start (``release``)."""
    monkeypatch.setattr(hopper, "PDL", pdl)
    if reach_keys:
        monkeypatch.setattr(hopper, "REACH_MIN_KEYS", reach_keys)
    made, real_plan = [], hopper_dkdv.dkdv_plan
    monkeypatch.setattr(hopper_dkdv, "dkdv_plan", lambda *args: made.append(real_plan(*args)) or made[-1])
    released, real_terms = [], plans.row_terms
    monkeypatch.setattr(plans, "row_terms", lambda *a, **kw: (released.append(kw["release"]), real_terms(*a, **kw))[1])
    q = torch.randn(2, 128, n_heads, head_dim, dtype=torch.bfloat16)
    k, v = (torch.randn(2, 128, n_kv, head_dim, dtype=torch.bfloat16) for _ in range(2))
    out, lse, dout = torch.randn_like(q), torch.randn(2, n_heads, 128), torch.randn_like(q)
    launch_backward.backward(dout, q, k, v, out, lse, None, None, torch.rand(n_heads) + 0.1, None, None, None, None,
                             0.1, True, 0.0, False, deterministic=None)
    plan, = made
    assert (plan.parts is not None) == (n_kv < n_heads) and bool(plan.launch.kwargs["REACH"]) == bool(reach_keys)
    assert plan.launch.kwargs.get("PDL", False) == plan.launch.kwargs.get("launch_pdl", False) == expected
    assert released == [expected]


@pytest.mark.skipif(hopper._IMPORT_ERROR is not None, reason="Gluon unavailable")
def test_first_write_dq_calls_the_constexpr_functions_body_to_the_same_answer():
    """``hopper_dkdv.first_write_dq`` calls ``consumers_dq``'s plain body (``.fn``) for host time; the ConstexprFunction
    itself gives the same answer for every tile width and bias kind."""
    from mpt_attention.impl.triton.hopper_dq import consumers_dq

    answers = set()
    for head_dim in (64, 72, 80, 96, 112, 128):
        for bias_full in (False, True):
            width = hopper.tile_dim(head_dim)
            block_m = hopper_dkdv.bwd_block_m(width, bias_full, True)
            expected = hopper.FIRST_WRITE_DQ and bool(consumers_dq(block_m, width))
            assert hopper_dkdv.first_write_dq(head_dim, bias_full, False) == expected
            assert not hopper_dkdv.first_write_dq(head_dim, bias_full, True)  # packed sequences keep the zero fill
            answers.add(expected)
    assert answers == {True, False}


@pytest.mark.parametrize("d", [pytest.param(64, id="d64"), pytest.param(160, id="d160")])
def test_one_key_is_read_without_key_descriptors(monkeypatch, d):
    """At ``s_k == 1`` Triton makes the key count a constant, and ptxas (CUDA 12.8) crashed compiling the forward
    and the dQ kernel's pipelined descriptor loads of K, V and a bias row: those launches read keys with plain
    loads, and two keys still take the descriptors (the interpreter's descriptors stand in for Hopper's)."""
    calls = []
    for module in (launch, launch_backward):
        monkeypatch.setattr(module, "launch_kernel", lambda fn, grid, *args, **kw: calls.append((fn.__name__, kw)))
    monkeypatch.setattr(hopper, "unsupported", lambda *args, **kwargs: "the general kernels under test")
    flags = {}
    for s_k in (1, 2):
        q = torch.randn(1, 5, 2, d, dtype=torch.float16)
        k, v = (torch.randn(1, s_k, 2, d, dtype=torch.float16) for _ in range(2))
        bias = torch.randn(1, 2, 1, s_k, dtype=torch.float16)
        out, lse = launch.forward(q, k, v, bias, None, None, None, None, None, d**-0.5, False, 0.0)
        out, lse = torch.randn_like(out), torch.randn(lse.shape)
        launch_backward.backward(torch.randn_like(out), q, k, v, out, lse, None, bias, None, None, None, None, None,
                                 d**-0.5, False, 0.0, False, deterministic=True)
        kw = dict(calls)
        flags[s_k] = (kw["_attn_fwd_kernel"]["KV_DESC"], kw["_attn_fwd_kernel"]["ROW_DESC"],
                      kw["_attn_bwd_dq_kernel"]["DESC"], kw["_attn_bwd_dq_kernel"]["ROW_DESC"])
        calls.clear()
    assert flags == {1: (False,) * 4, 2: (True,) * 4}
