"""Test and benchmark helpers: input factories, an independent float64 reference, tolerances.

The reference here is written independently of every backend (explicit position arithmetic,
per-head loops over the GQA mapping, float64), so a shared mistake in ``masks.py`` cannot hide.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["AttnCase", "make_inputs", "reference_attention", "assert_close_to_reference", "attention_flops",
           "make_varlen_inputs", "reference_attention_varlen", "assert_compiled_matches_eager", "capture_cuda_graph",
           "check_seqused", "varlen_backend_and_slopes"]


@dataclass
class AttnCase:
    """One attention problem; ``make_inputs`` turns it into tensors."""

    batch: int = 2
    s_q: int = 37
    s_k: int = 37
    n_heads: int = 4
    n_kv: int = 4
    head_dim: int = 32
    causal: bool = False
    alibi: bool = False
    bias: str | None = None  # None, "vector" (1, H, 1, S_k), "matrix" (B, 1, S_q, S_k), "full" (B, H, S_q, S_k)
    padding: bool | str = False  # True / "right": right padding; "left": left padding
    sequence_id: bool = False
    prefix: bool = False
    extras: dict = field(default_factory=dict)

    def id(self) -> str:
        parts = [f"B{self.batch}-Sq{self.s_q}-Sk{self.s_k}-H{self.n_heads}/{self.n_kv}-D{self.head_dim}"]
        parts += [name for name in ("causal", "alibi", "sequence_id", "prefix") if getattr(self, name)]
        if self.padding:
            parts.append("left-padding" if self.padding == "left" else "padding")
        if self.bias:
            parts.append(f"bias-{self.bias}")
        return "-".join(parts)


def make_inputs(case: AttnCase, dtype=torch.float32, device="cpu", requires_grad=False, seed=0) -> tuple[tuple, dict]:
    """Random ``(q, k, v)`` in ``(B, S, H, D)`` and the keyword arguments of ``attention`` for ``case``."""
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype).requires_grad_(requires_grad)

    b, s_q, s_k, h, hkv, d = case.batch, case.s_q, case.s_k, case.n_heads, case.n_kv, case.head_dim
    q, k, v = randn(b, s_q, h, d), randn(b, s_k, hkv, d), randn(b, s_k, hkv, d)
    kw: dict = dict(causal=case.causal)
    if case.alibi:
        from mpt_attention.masks import gen_slopes

        kw["alibi_slopes"] = gen_slopes(h, return_1d=True, device=device)
    if case.bias:
        shape = {"vector": (1, h, 1, s_k), "matrix": (b, 1, s_q, s_k), "full": (b, h, s_q, s_k)}[case.bias]
        kw["attn_bias"] = torch.randn(*shape, generator=gen).to(device).requires_grad_(requires_grad)
    if case.padding:
        # right padding with a different live length per batch row, the first row unpadded
        lengths = [s_k] + [int(torch.randint(1, s_k + 1, (1,), generator=gen)) for _ in range(b - 1)]
        live = torch.arange(s_k).view(1, s_k) < torch.tensor(lengths).view(b, 1)
        kw["key_padding_mask"] = (live.flip(1) if case.padding == "left" else live).to(device)
    if case.sequence_id:
        cuts = torch.randint(0, 3, (b, s_k), generator=gen) == 0
        kw["sequence_id"] = torch.cumsum(cuts.long(), dim=1).to(device)
    if case.prefix:
        lengths = torch.randint(0, s_k + 1, (b, 1), generator=gen)
        kw["prefix_mask"] = (torch.arange(s_k).view(1, s_k) < lengths).to(device)
    return (q, k, v), kw


def reference_attention(
    q, k, v, *, causal=False, softmax_scale=None, alibi_slopes=None, attn_bias=None, key_padding_mask=None,
    sequence_id=None, prefix_mask=None, dropout_mask=None, dropout_p=0.0, compute_dtype=torch.float64,
):
    """Attention computed head by head in ``compute_dtype`` (float64: the measuring stick).

    With a lower ``compute_dtype`` it is "the same math in low precision" that the tolerance rule
    compares against. ``dropout_mask`` ``(B, H, S_q, S_k)`` bool (True = keep) applies dropout exactly.

    Returns:
        ``(out (B, S_q, H, D) in compute_dtype, lse (B, H, S_q) float64)``.
    """
    batch, s_q, n_heads, head_dim = q.shape
    s_k, n_kv = k.shape[1], k.shape[2]
    group = n_heads // n_kv
    scale = head_dim**-0.5 if softmax_scale is None else softmax_scale
    qpos = (torch.arange(s_q, device=q.device) + (s_k - s_q)).view(s_q, 1)  # absolute positions
    kpos = torch.arange(s_k, device=q.device).view(1, s_k)
    outs, lses = [], []
    for h in range(n_heads):
        qh = q[:, :, h].to(compute_dtype)
        kh, vh = k[:, :, h // group].to(compute_dtype), v[:, :, h // group].to(compute_dtype)
        scores = torch.einsum("bid,bjd->bij", qh, kh) * scale
        if alibi_slopes is not None:
            slope = alibi_slopes.to(compute_dtype)
            slope = slope[h] if slope.dim() == 1 else slope[:, h].view(batch, 1, 1)
            distance = (kpos - (s_k - 1)) if (causal and prefix_mask is None) else -(qpos - kpos).abs()
            scores = scores + slope * distance.to(compute_dtype)
        if attn_bias is not None:
            bias = attn_bias.to(compute_dtype).expand(batch, n_heads, s_q, s_k)[:, h]
            scores = scores + bias
        allowed = torch.ones(batch, s_q, s_k, dtype=torch.bool, device=q.device)
        if causal:
            visible = (kpos <= qpos).view(1, s_q, s_k)
            if prefix_mask is not None:
                visible = visible | prefix_mask.view(batch, 1, s_k)
            allowed &= visible
        if key_padding_mask is not None:
            allowed &= key_padding_mask.view(batch, 1, s_k)
        if sequence_id is not None:
            allowed &= sequence_id[:, s_k - s_q:].view(batch, s_q, 1) == sequence_id.view(batch, 1, s_k)
        scores = scores.masked_fill(~allowed, float("-inf"))
        row_max = scores.amax(-1, keepdim=True) if s_k else scores.new_full((batch, s_q, 1), float("-inf"))
        empty = row_max == float("-inf")
        weights = torch.exp(scores - torch.where(empty, 0.0, row_max))
        total = weights.sum(-1, keepdim=True)
        lse = torch.where(empty, float("-inf"), row_max + torch.log(torch.where(empty, 1.0, total)))
        probs = torch.where(empty, 0.0, weights / torch.where(empty, 1.0, total))
        if dropout_mask is not None:
            probs = probs * dropout_mask[:, h].to(compute_dtype) / (1.0 - dropout_p)
        outs.append(torch.einsum("bij,bjd->bid", probs, vh))
        lses.append(lse.squeeze(-1).double())
    return torch.stack(outs, dim=2), torch.stack(lses, dim=1)


def make_varlen_inputs(lens_q, lens_k, n_heads, n_kv, head_dim, dtype=torch.float32, device="cpu", seed=0,
                       requires_grad=False):
    """Packed ``q (T_q, H_q, D)``, ``k, v (T_k, H_kv, D)`` and int32 ``cu_seqlens_q, cu_seqlens_k`` for
    sequences of the given lengths (the inputs of ``attention_varlen``)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype).requires_grad_(requires_grad)

    def cumulative(lengths):
        return torch.tensor([0] + list(lengths), dtype=torch.int32).cumsum(0, dtype=torch.int32).to(device)

    q = randn(sum(lens_q), n_heads, head_dim)
    k, v = randn(sum(lens_k), n_kv, head_dim), randn(sum(lens_k), n_kv, head_dim)
    return q, k, v, cumulative(lens_q), cumulative(lens_k)


def reference_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, *, alibi_slopes=None, **kwargs):
    """:func:`reference_attention` on each packed sequence alone, concatenated:
    ``(out (T_q, H, D), lse (H, T_q))``. ``alibi_slopes`` ``(H,)`` or one row per sequence ``(B, H)``."""
    outs, lses = [], []
    for b in range(cu_seqlens_q.numel() - 1):
        qs = slice(int(cu_seqlens_q[b]), int(cu_seqlens_q[b + 1]))
        ks = slice(int(cu_seqlens_k[b]), int(cu_seqlens_k[b + 1]))
        slopes = alibi_slopes if alibi_slopes is None or alibi_slopes.dim() == 1 else alibi_slopes[b]
        out, lse = reference_attention(q[qs][None], k[ks][None], v[ks][None], alibi_slopes=slopes, **kwargs)
        outs.append(out[0])
        lses.append(lse[0])
    return torch.cat(outs), torch.cat(lses, dim=1)


def varlen_backend_and_slopes(backend: str, alibi: str | None, n_heads: int, n_sequences: int):
    """``(backend, extra keywords, alibi_slopes)`` of a packed-sequence test case: ``"triton-atomic-dq"`` is the
    triton backend with ``deterministic=False`` (dQ through atomics); ``alibi`` None, ``"heads"`` (MPT's slopes,
    ``(H,)``) or ``"batch"`` (those scaled per sequence, ``(B, H)``)."""
    extra = {}
    if backend == "triton-atomic-dq":
        backend, extra = "triton", dict(deterministic=False)
    slopes = None
    if alibi:
        from mpt_attention.masks import gen_slopes

        slopes = gen_slopes(n_heads, return_1d=True)
        if alibi == "batch":
            slopes = slopes.view(1, n_heads) * torch.linspace(0.5, 1.5, n_sequences).view(-1, 1)
    return backend, extra, slopes


def check_seqused(backend, cap_q, used_q, cap_k, used_k, n_heads, n_kv, head_dim, causal, slopes=None,
                  dtype=torch.float32, device="cpu", **extra) -> None:
    """``attention_varlen`` with ``seqused_q``/``seqused_k`` (lists, or None: every row) over sequences of ``cap_q`` /
    ``cap_k`` rows, the unused rows of q, k, v and of the output's gradient NaN: the used rows' output, log-sum-exp
    and gradients against :func:`reference_attention_varlen` run on the used rows alone (float64, and in ``dtype``
    for the tolerance); the unused rows' output and gradients exactly 0, their log-sum-exp -inf."""
    from mpt_attention import attention_varlen

    q, k, v, cu_q, cu_k = make_varlen_inputs(cap_q, cap_k, n_heads, n_kv, head_dim, dtype, device, requires_grad=True)

    def rows(cu, caps, used):
        used = caps if used is None else used
        live = torch.zeros(int(cu[-1]), dtype=torch.bool)
        for start, u in zip(cu[:-1].tolist(), used):
            live[start:start + u] = True
        cu_used = torch.tensor([0] + list(used), dtype=torch.int32).cumsum(0, dtype=torch.int32)
        return live.to(device), cu_used.to(device)

    live_q, cu_used_q = rows(cu_q, cap_q, used_q)
    live_k, cu_used_k = rows(cu_k, cap_k, used_k)
    with torch.no_grad():
        q[~live_q] = float("nan")
        k[~live_k] = float("nan")
        v[~live_k] = float("nan")
    as_tensor = lambda used: None if used is None else torch.tensor(used, dtype=torch.int32, device=device)
    kw = dict(causal=causal, alibi_slopes=slopes)
    result = attention_varlen(q, k, v, cu_q, cu_k, backend=backend, seqused_q=as_tensor(used_q),
                              seqused_k=as_tensor(used_k), return_lse=backend != "sdpa", **kw, **extra)
    out, lse = result if backend != "sdpa" else (result, None)
    dout = torch.randn_like(out)
    dout[~live_q] = float("nan")  # never read either
    grads = torch.autograd.grad(out, (q, k, v), dout)

    used_inputs = [x.detach()[live] for x, live in ((q, live_q), (k, live_k), (v, live_k))]
    inputs64 = [x.double().requires_grad_() for x in used_inputs]
    ref, ref_lse = reference_attention_varlen(*inputs64, cu_used_q, cu_used_k, **kw)
    ref_grads = torch.autograd.grad(ref, inputs64, dout[live_q].double())
    low_inputs = [x.clone().requires_grad_() for x in used_inputs]
    low, low_lse = reference_attention_varlen(*low_inputs, cu_used_q, cu_used_k, compute_dtype=dtype, **kw)
    low_grads = torch.autograd.grad(low, low_inputs, dout[live_q].to(low.dtype))

    assert_close_to_reference("out", out[live_q], ref, low)
    assert torch.equal(out[~live_q], torch.zeros_like(out[~live_q])), "unused query rows' output must be 0"
    for name, g, r, lo, live in zip(["dq", "dk", "dv"], grads, ref_grads, low_grads, (live_q, live_k, live_k)):
        assert_close_to_reference(name, g[live], r, lo)
        assert torch.equal(g[~live], torch.zeros_like(g[~live])), f"{name}: unused rows' gradient must be 0"
    if lse is not None:
        assert torch.isneginf(lse[:, ~live_q]).all(), "unused query rows' log-sum-exp must be -inf"
        finite = torch.isfinite(ref_lse)
        assert torch.equal(torch.isfinite(lse[:, live_q]), finite)
        assert_close_to_reference("lse", lse[:, live_q][finite], ref_lse[finite], low_lse[finite])


def _max_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    both_inf = torch.isinf(x) & torch.isinf(ref) & (torch.sign(x) == torch.sign(ref))
    return (x.double() - ref.double()).masked_fill(both_inf, 0.0).abs().max().item() if x.numel() else 0.0


def assert_close_to_reference(name: str, out: torch.Tensor, ref: torch.Tensor, low_ref: torch.Tensor,
                              factor: float = 2.0, floor: float | None = None, allowance: float = 0.0) -> None:
    """``max|out - ref| <= factor * max|low_ref - ref| + allowance + floor`` (the flash-attn tolerance rule).

    ``ref`` is the float64 result, ``low_ref`` the same math in the tested precision; NaN never passes.
    ``floor`` absorbs the rounding of exact float32 cases (default: 1e-5 for float32, else 1e-4);
    ``allowance`` an error the tested math has by construction (``assert_gradients_close_to_reference``).
    """
    if floor is None:
        floor = 1e-5 if out.dtype == torch.float32 else 1e-4
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    assert not torch.isnan(out).any(), f"{name}: NaN in output ({int(torch.isnan(out).sum())} elements)"
    err, budget = _max_err(out, ref), factor * _max_err(low_ref, ref) + allowance + floor
    assert err <= budget, (f"{name}: max error {err:.3e} > {factor} x low-precision error + {allowance:.3e} + "
                           f"{floor:g} = {budget:.3e}")


def assert_agrees_with_every_block(out, every, v, lse=None, every_lse=None) -> None:
    """A forward that skipped the key blocks past causal ALiBi's reach (``impl/triton/reach.py``) against the same
    call computing every visible block. The keys left out weigh less than S_k 2^-48 of their rows, but the two
    start a row's online softmax at different blocks, whose scores round differently in float32 (the Hopper forward's
    first block adds ALiBi's extension product after Q K^T, the later ones before it), so a probability may round
    to its neighbour in q's 16-bit type for P V, at most 2^-7 of it away: the outputs differ by at most 2^-7 max|v|
    before the cast and a unit in the last place after. The log-sum-exps, float32 sums of the same terms, within
    1e-5 and a few units in the last place (MPT's ALiBi puts an early row's near -slope * S_k)."""
    diff = (out.float() - every.float()).abs()
    bound = (every.float().abs() + v.float().abs().amax()) * 2.0 ** -7
    assert (diff <= bound).all(), f"max difference {diff.max():.3e}, beyond 2^-7 (|every| + max|v|)"
    if lse is not None:
        torch.testing.assert_close(lse, every_lse, rtol=2.0 ** -21, atol=1e-5)


def assert_forward_matches_reference(q, k, v, backend: str = "triton", lse_atol: float = 1e-3, **kw) -> None:
    """``attention(q, k, v, backend=backend, **kw)``'s output against the float64 reference within twice the error
    of the same math in q's dtype, and its log-sum-exp within ``lse_atol``."""
    from mpt_attention import attention

    out, lse = attention(q, k, v, backend=backend, return_lse=True, **kw)
    ref, ref_lse = reference_attention(q.double(), k.double(), v.double(), **kw)
    low, _ = reference_attention(q, k, v, compute_dtype=q.dtype, **kw)
    assert_close_to_reference("out", out, ref, low)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=0, atol=lse_atol)


def assert_gradients_close_to_reference(out, grads, inputs, kw: dict, dout, dtype, dlse=None,
                                        rounded_out: bool = False) -> None:
    """``out`` and its ``grads`` w.r.t. ``inputs`` (q, k, v and, when it takes a gradient, the bias ``kw``
    holds as ``attn_bias``), each by ``assert_close_to_reference`` against reference_attention recomputed
    from copies in float64 and in ``dtype``; the other keywords from ``kw``. ``dlse`` ``(B, H, S_q)``: the
    grads are of ``out * dout + lse * dlse`` (a loss that also uses the log-sum-exp).

    ``rounded_out``: also allow each gradient the error a flash-style backward has by construction: it forms
    ``dS = P * (dP - delta)`` with ``delta = rowsum(dO * out)`` from the output as returned, rounded, where
    autograd's softmax uses ``rowsum(dP * P)``. That is the float64 gradient with ``-rowsum(dO * (out - O))``
    reaching the log-sum-exp; its distance from the float64 gradient is the allowance. It matters where
    ``dP - delta`` cancels (a sharp softmax) and at tiny sizes, whose low-precision error can be small by chance
    (randomized tests: docs/errors.md)."""

    def recompute(xs, **extra):
        xs = [x.requires_grad_() for x in xs]
        bias = xs[3] if len(xs) > 3 else kw.get("attn_bias")
        ref, lse = reference_attention(*xs[:3], **{**kw, "attn_bias": bias}, **extra)
        if dlse is None:
            return ref, torch.autograd.grad(ref, xs, dout.to(ref.dtype))
        return ref, torch.autograd.grad([ref, lse], xs, [dout.to(ref.dtype), dlse.to(lse.dtype)])

    ref, ref_grads = recompute([x.detach().double() for x in inputs])
    low, low_grads = recompute([x.detach().clone() for x in inputs], compute_dtype=dtype)
    assert_close_to_reference("out", out, ref, low)
    allowances = [0.0] * len(grads)
    if rounded_out:
        from_out = -(dout.double() * (out.detach().double() - ref.detach())).sum(-1).transpose(1, 2)
        dlse = from_out if dlse is None else dlse.double() + from_out
        _, flash_grads = recompute([x.detach().double() for x in inputs])
        allowances = [_max_err(f, r) for f, r in zip(flash_grads, ref_grads)]
    for name, g, r, lo, allow in zip(["dq", "dk", "dv", "dbias"], grads, ref_grads, low_grads, allowances):
        assert g is not None, f"{name} missing"
        assert_close_to_reference(name, g, r, lo, allowance=allow)


def profile_kernels(step, steps: int = 3) -> list[tuple[float, int, str]]:
    """``(ms per step, launches per step, name)`` of each GPU kernel ``step`` runs, longest first, from
    torch.profiler over ``steps`` calls after one warm-up call (benchmarks' per-kernel tables)."""
    from torch.profiler import ProfilerActivity, profile

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    return [(e.device_time_total / steps / 1000, e.count // steps, e.key)
            for e in sorted(events, key=lambda e: -e.device_time_total)]


def host_us(fn, calls: int = 30, warmup: int = 1, until_idle: bool = False) -> float:
    """Mean microseconds per call of ``fn`` over ``calls`` calls without a synchronisation between them, after
    ``warmup`` calls and a synchronisation: the host's time per call while the GPU queue stays full (a call whose
    host time exceeds its kernels' is bound by the host). ``until_idle``: the final synchronisation counted too (the
    pace of whichever of host and GPU is slower)."""
    import time

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    if until_idle:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / calls * 1e6


def profile_host(fn, calls: int, *orders: tuple[str, int]) -> None:
    """cProfile of ``calls`` calls of ``fn`` (the device synchronised after them), printed once per ``(sort key,
    lines)`` of ``orders``: where a call's host time goes (benchmarks' host probes)."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    prof.disable()
    torch.cuda.synchronize()
    stats = pstats.Stats(prof)
    for key, lines in orders:
        stats.sort_stats(key).print_stats(lines)


def capture_cuda_graph(fn):
    """``fn`` captured in a CUDA graph after one warm-up run off the capture (compiles, allocator state):
    ``(graph, what the captured call returned)``. GPU tests replay it; benchmarks time its replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        result = fn()
    return graph, result


def attention_flops(batch: int, n_heads: int, s_q: int, s_k: int, head_dim: int, causal: bool,
                    mode: str = "fwd") -> float:
    """FLOPs of attention: 4*B*H*S_q*S_k_eff*D forward, bottom-right causal counted exactly per row.

    ``mode``: ``'fwd'``, ``'bwd'`` (2.5x forward) or ``'fwd_bwd'`` (3.5x).
    """
    if causal:
        # row i sees min(S_k, max(0, i + S_k - S_q + 1)) keys; summed in closed form
        hidden = max(0, s_q - s_k)  # rows that see nothing
        rows = s_q - hidden
        visible = rows * (s_k - rows) + rows * (rows + 1) / 2
    else:
        visible = s_q * s_k
    fwd = 4.0 * batch * n_heads * visible * head_dim
    return fwd * {"fwd": 1.0, "bwd": 2.5, "fwd_bwd": 3.5}[mode]


def assert_compiled_matches_eager(step, inputs) -> None:
    """``torch.compile(step, fullgraph=True)`` gives eager's outputs and input gradients.

    ``step(*inputs)`` returns a tensor or a tuple of tensors; the first is summed for the backward.
    """
    import torch._dynamo

    def run(fn):
        for t in inputs:
            t.grad = None
        outs = fn(*inputs)
        outs = outs if isinstance(outs, tuple) else (outs,)
        outs[0].sum().backward()
        return [o.detach() for o in outs], [t.grad.clone() for t in inputs]

    torch._dynamo.reset()
    got, got_grads = run(torch.compile(step, fullgraph=True, backend="aot_eager"))
    ref, ref_grads = run(step)
    for a, b in zip(got + got_grads, ref + ref_grads):
        torch.testing.assert_close(a, b)
