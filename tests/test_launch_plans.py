"""The Hopper route's launch plans (``impl/triton/plans.py``), checked without a GPU: a call that takes a plan kept
for its inputs' signature launches exactly what a call deciding afresh launches (kernels, grids, options, every
scalar, every descriptor's static part, and each tensor argument in the same role), over inputs whose signatures
differ in one thing each, in one shared set of plans, so a key that left out something a plan reads would hand one
input another's plan. The kernels themselves run with plans in tests/test_gpu_hopper.py."""

import pytest
import torch

pytest.importorskip("triton")
from mpt_attention.impl.triton import hopper, launch, launch_backward, lean_launch, plans  # noqa: E402

pytestmark = pytest.mark.skipif(hopper._IMPORT_ERROR is not None, reason="Gluon unavailable")


class _Launches(list):
    checks: list


@pytest.fixture
def recorded(monkeypatch, hopper_route_on_cpu):
    """Every launch as ``(kernel name, grid, args, kwargs)``, not run; the Hopper route forced for CPU tensors (an SM
    count of 8), and ``hopper.unsupported``'s calls counted (``recorded.checks``)."""
    monkeypatch.setattr(hopper, "sm_count", lambda device_index: 8)
    calls = _Launches()
    for module in (lean_launch, launch, launch_backward):
        monkeypatch.setattr(module, "launch_kernel",
                            lambda fn, grid, *args, **kw: calls.append((fn.__name__, tuple(grid), args, kw)))
    calls.checks = hopper_route_on_cpu
    return calls


def _inputs(case: dict) -> dict:
    """Fresh tensors of the case's signature: every call makes new ones (other addresses, same alignment)."""
    d, h, h_kv, s = case.get("d", 128), case.get("h", 4), case.get("h_kv", 4), case.get("s", 128)
    dtype = case.get("dtype", torch.bfloat16)
    if case.get("layout") == "packed-qkv":  # the seed's (B, S, 3 * H * D) projection
        qkv = torch.randn(2, s, 3 * h * d, dtype=dtype)
        q, k, v = (t.unflatten(-1, (h, d)) for t in qkv.chunk(3, dim=-1))
    else:
        q = torch.randn(2, s, h, d, dtype=dtype)
        k, v = (torch.randn(2, s, h_kv, d, dtype=dtype) for _ in range(2))
        if case.get("layout") == "bhsd":
            q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    if case.get("offset"):  # q 8 bytes past a 16-byte boundary
        q = torch.randn(q.numel() + 4, dtype=dtype)[4:].view(q.shape)
    slopes = {"heads": torch.rand(h), "batch": torch.rand(2, h), None: None}[case.get("slopes", "heads")]
    bias = None
    if case.get("bias") == "row":
        bias = torch.randn(1, h, 1, s, dtype=case.get("bias_dtype", torch.float32))
    elif case.get("bias") == "matrix":
        bias = torch.randn(2, h, s, s, dtype=dtype).requires_grad_(case.get("bias_grad", False))
    out = torch.randn(q.shape, dtype=dtype)
    return dict(q=q, k=k, v=v, bias=bias, slopes=slopes, out=out, lse=torch.randn(2, h, s), dout=torch.randn_like(out),
                dlse=torch.randn(2, h, s) if case.get("dlse") else None)


def _packed_inputs(case: dict) -> dict:
    """Packed sequences of the case's signature: ``n_seq`` of them, the first ``s`` rows long (the longest), the rest
    of random lengths adding up to a fixed total, so that calls of one signature differ in their lengths (which no
    plan may read); ``seqused``: random used lengths (``"keys"``: of the keys alone); ``max_q``, ``max_k``: longest
    lengths passed larger than any."""
    d, h, h_kv, s, n_seq = case.get("d", 128), case.get("h", 4), case.get("h_kv", 4), case.get("s", 128), \
        case.get("n_seq", 3)
    dtype = case.get("dtype", torch.bfloat16)
    cuts = sorted(torch.randint(0, s * (n_seq - 1) // 2 + 1, (n_seq - 2,)).tolist())
    rest = [b - a for a, b in zip([0, *cuts], [*cuts, s * (n_seq - 1) // 2])]
    lens = [s, *rest]
    cu = torch.tensor([0, *lens]).cumsum(0, dtype=torch.int32)
    n_tokens = int(cu[-1])
    q = torch.randn(n_tokens, h, d, dtype=dtype)
    k, v = (torch.randn(n_tokens, h_kv, d, dtype=dtype) for _ in range(2))
    used = None
    if case.get("seqused"):
        used = torch.tensor([int(torch.randint(0, n + 1, ())) for n in lens], dtype=torch.int32)
    slopes = torch.rand(h) if case.get("slopes", "heads") else None
    out = torch.randn(q.shape, dtype=dtype)
    return dict(q=q, k=k, v=v, bias=None, slopes=slopes, out=out, lse=torch.randn(h, n_tokens),
                dout=torch.randn_like(out), dlse=None, cu_q=cu, cu_k=cu.clone(),
                used_q=None if case.get("seqused") == "keys" else used, used_k=None if used is None else used.clone())


def _step(case: dict, t: dict):
    """A forward and a backward through ``launch`` (as the eager op calls them); returns their outputs."""
    scale, causal = case.get("scale", 0.125), case.get("causal", True)
    packed = {}
    if "cu_q" in t:
        packed = dict(cu_q=t["cu_q"], cu_k=t["cu_k"], max_q=case.get("max_q", case.get("s", 128)),
                      max_k=case.get("max_k", case.get("s", 128)), used_q=t["used_q"], used_k=t["used_k"])
    fwd = launch.forward(t["q"], t["k"], t["v"], t["bias"], t["slopes"], None, None, None, None, scale, causal, 0.0,
                         **packed)
    bias_grad = t["bias"] is not None and t["bias"].requires_grad
    bwd = launch_backward.backward(t["dout"], t["q"], t["k"], t["v"], t["out"], t["lse"], t["dlse"], t["bias"],
                                   t["slopes"], None, None, None, None, scale, causal, 0.0, bias_grad,
                                   deterministic=case.get("deterministic"), **packed)
    return (*fwd, *bwd)


def _described(x, roles: dict):
    """An argument as the comparison sees it: tensors by role (which input, or the n-th new buffer) and layout;
    descriptors by their static fields and their base's role; anything else as it is."""
    if isinstance(x, torch.Tensor):
        role = next((name for name, t in roles["inputs"].items() if t is not None and t.data_ptr() == x.data_ptr()
                     and x.numel()), None)
        if role is None:
            role = roles["new"].setdefault(x.data_ptr(), f"new{len(roles['new'])}")
        return ("tensor", role, tuple(x.shape), x.stride(), x.dtype)
    if hopper._IMPORT_ERROR is None and type(x).__name__ == "TensorDescriptor":
        return ("descriptor", _described(x.base, roles), list(x.shape), list(x.strides), list(x.block_shape),
                id(x.layout), {name: value for name, value in vars(x).items()
                               if name not in ("base", "shape", "strides", "block_shape", "layout")})
    return x


def _launches(recorded, case: dict, planned: bool, monkeypatch):
    monkeypatch.setattr(plans, "ENABLED", planned)
    for name, value in case.get("switches", {}).items():
        monkeypatch.setattr(hopper, name, value)
    start = len(recorded)
    tensors = _packed_inputs(case) if case.get("packed") else _inputs(case)
    outputs = _step(case, tensors)
    roles = {"inputs": {k: v for k, v in tensors.items()}, "new": {}}
    launches = [(name, grid, [_described(a, roles) for a in args], kw) for name, grid, args, kw in recorded[start:]]
    return launches, [_described(o, roles) for o in outputs]


CASES = [
    pytest.param(dict(), id="d128-alibi"),
    pytest.param(dict(scale=0.25), id="another-scale"),
    pytest.param(dict(causal=False), id="non-causal"),
    pytest.param(dict(slopes="batch"), id="slopes-per-batch"),
    pytest.param(dict(slopes=None), id="no-bias"),
    pytest.param(dict(d=64, h_kv=2), id="d64-gqa"),
    pytest.param(dict(d=64, h=4, h_kv=1), id="d64-mqa"),
    pytest.param(dict(d=80, h_kv=2, layout="bhsd"), id="d80-gqa-bhsd"),
    pytest.param(dict(d=128, layout="packed-qkv"), id="packed-qkv"),
    pytest.param(dict(offset=True), id="q-misaligned"),
    pytest.param(dict(s=200), id="s200"),
    pytest.param(dict(dtype=torch.float16), id="fp16"),
    pytest.param(dict(slopes=None, bias="row"), id="bias-row"),
    pytest.param(dict(slopes=None, bias="row", bias_dtype=torch.bfloat16), id="bias-row-bf16"),
    pytest.param(dict(slopes=None, bias="matrix"), id="bias-matrix"),
    pytest.param(dict(slopes=None, bias="matrix", bias_grad=True), id="bias-matrix-with-grad"),
    pytest.param(dict(dlse=True), id="lse-gradient"),
    # (deterministic=True on the Hopper route runs the dQ kernel on a side stream: CUDA only; it takes no plan)
    pytest.param(dict(deterministic=False), id="any-order"),
    pytest.param(dict(switches=dict(FIRST_WRITE_DQ=False)), id="first-write-off"),
    pytest.param(dict(h=8, h_kv=2, switches=dict(FUSED_GROUP_HEADS=4)), id="four-heads-per-program"),
    pytest.param(dict(switches=dict(ENABLED=False)), id="hopper-off"),
    pytest.param(dict(packed=True), id="packed"),
    pytest.param(dict(packed=True, n_seq=4), id="packed-more-sequences"),
    pytest.param(dict(packed=True, d=64, h_kv=2), id="packed-d64-gqa"),
    pytest.param(dict(packed=True, causal=False), id="packed-non-causal"),
    pytest.param(dict(packed=True, slopes=None), id="packed-no-alibi"),
    pytest.param(dict(packed=True, max_q=160), id="packed-longer-max-q"),
    pytest.param(dict(packed=True, max_k=4096), id="packed-longer-max-k"),
    pytest.param(dict(packed=True, seqused=True), id="packed-seqused"),
    pytest.param(dict(packed=True, seqused=True, max_k=4096), id="packed-seqused-longer-max-k"),
    pytest.param(dict(packed=True, seqused="keys"), id="packed-seqused-keys-only"),
    pytest.param(dict(packed=True, switches=dict(PACKED_CLEARS=True)), id="packed-clears"),
    pytest.param(dict(packed=True, switches=dict(REACH_MIN_KEYS=64)), id="packed-reach"),
]


@pytest.mark.parametrize("case", CASES)
def test_a_kept_plan_launches_what_a_fresh_decision_launches(recorded, monkeypatch, case):
    """The same step three times on fresh tensors of one signature: deciding afresh, planning, then taking the plan
    kept (no route check left): identical launches and outputs, role for role."""
    fresh = _launches(recorded, case, False, monkeypatch)
    cold = _launches(recorded, case, True, monkeypatch)
    checks = len(recorded.checks)
    warm = _launches(recorded, case, True, monkeypatch)
    assert cold == fresh
    assert warm == fresh
    hopper_route = any(name.startswith("_hopper") for name, *_ in fresh[0])
    if hopper_route and not case.get("deterministic"):
        assert len(recorded.checks) == checks  # both directions planned: no route decided again
    assert len(plans.KEPT) >= 1


def test_plans_kept_side_by_side_hand_each_signature_its_own(recorded, monkeypatch):
    """Every case's step planned in one set of plans, twice over (the second pass takes kept plans only), against
    each case decided afresh: a key missing something a plan reads would hand a case another's launches."""
    cases = [p.values[0] for p in CASES]
    expected = []
    for case in cases:
        with monkeypatch.context() as patch:
            expected.append(_launches(recorded, case, False, patch))
    monkeypatch.setattr(plans, "KEPT", {})
    for _ in range(2):
        for case, want in zip(cases, expected):
            with monkeypatch.context() as patch:
                assert _launches(recorded, case, True, patch) == want, case
