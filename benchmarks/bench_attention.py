"""Causal attention on the GPU: our Triton kernels beside every peer, in one run, on one card.

    python benchmarks/bench_attention.py --out DIR [--modes fwd,fwd_bwd] [--suite main,extras,noncausal] [--quick]

Providers (bf16, causal): ``triton-alibi`` (ours, slopes in-kernel; the Hopper kernel on sm_90, which skips the key
blocks past causal ALiBi's reach at S >= ``hopper.REACH_MIN_KEYS``, half that in a training step, whose forward
from a quarter to three quarters of it instead reads every block and hands its backward a table of the first key
blocks within reach; the forwards here run on inputs that need gradients: impl/triton/reach.py),
``triton-alibi-all-blocks``
(the same computing every visible block: what the ALiBi term itself costs), ``triton-alibi-general`` (the same with
the general Triton forward kernel), ``triton`` (ours, no bias),
``triton-vecbias`` (ours, MPT's (1, H, 1, S) bias tensor), ``cudnn`` and ``fa2`` (SDPA, no bias),
``flex-alibi`` (compiled FlexAttention with an ALiBi score_mod), ``fa4`` / ``fa4-alibi``
(flash-attn-4, if importable), ``memeff-dense`` (SDPA memory-efficient with the dense ALiBi bias
MPT users materialise) and ``eager`` (the seed's torch path; small shapes only).

Suite ``noncausal``: the main suite's shapes without the causal mask, ALiBi in its symmetric form
-slope * |i - j| (MPT's full bias; BERT-style encoders) for ``triton-alibi``, ``flex-alibi``, ``fa4-alibi`` and
``memeff-dense``; ``triton-vecbias`` and ``eager`` (MPT's causal-form row) are left out.

Writes ``results.csv``, ``results.json`` and ``tflops.png`` under ``--out`` and prints a table last.
Main suite: every provider of a shape is measured ``--rounds`` times (3), the rounds alternated, and
the median is reported with its spread ((max - min) / median); a single measurement per cell moved by
several percent between runs (benchmarks/NOTES.md, session 13). The ratios whose targets are a few percent (ALiBi
against no bias, MPT's bias row against slopes: ``PAIRS``) are also measured paired, the two providers' calls
interleaved (``paired_ratio``).
TFLOP/s use 4*B*H*S_q*S_k_visible*D per forward (causal counted per row), 3.5x for forward+backward.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import operator
import os
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone

import torch
import torch.nn.functional as F
from triton.testing import do_bench

import mpt_attention as M
from mpt_attention.padding import cu_seqlens_from_sequence_id, pad, right_padded, unpad
from mpt_attention.testing import attention_flops, capture_cuda_graph

MAIN_SHAPES = [  # (B, H_q, H_kv, S, D): 16k tokens per batch
    (8, 16, 16, 2048, 128),
    (2, 16, 16, 8192, 128),
    (4, 32, 32, 4096, 64),
    (1, 16, 16, 16384, 128),
    (2, 32, 4, 8192, 128),  # GQA 32:4
    (8, 32, 32, 2048, 64),  # the lower lengths (S 1k-16k): a training step's forward computes every block
    (16, 16, 16, 1024, 128),  # at both and its backward skips by the forward's table (hopper.forward_table_applies)
]


def _fa4():
    try:
        from flash_attn.cute import flash_attn_func  # noqa: F401
    except Exception as exc:  # not installed here, or its DSL failed to load
        return None, f"{type(exc).__name__}: {exc}"[:200]
    return flash_attn_func, None


def _fa4_alibi_mods(n_heads: int, causal: bool = True):
    """ALiBi as a flash-attn-4 score_mod: + slope_h * (kv - q) (causal), - slope_h * |kv - q| (not),
    slope_h = 2^(-8 (h+1) / H)."""
    import cutlass
    import cutlass.cute as cute

    step = -8.0 / n_heads

    @cute.jit
    def alibi(scores, b_idx, h_idx, q_idx, kv_idx, seqlen_info, aux_tensors):
        s = scores.to(cutlass.Float32)
        heads = (h_idx + cute.full_like(h_idx, 1)).to(cutlass.Float32)
        slope = cute.math.exp2(heads * cute.full_like(s, step))
        return s + slope * (kv_idx - q_idx).to(cutlass.Float32)

    @cute.jit
    def alibi_symmetric(scores, b_idx, h_idx, q_idx, kv_idx, seqlen_info, aux_tensors):
        s = scores.to(cutlass.Float32)
        heads = (h_idx + cute.full_like(h_idx, 1)).to(cutlass.Float32)
        slope = cute.math.exp2(heads * cute.full_like(s, step))
        dist = cute.where(operator.ge(q_idx, kv_idx), q_idx - kv_idx, kv_idx - q_idx)
        return s - slope * dist.to(cutlass.Float32)

    @cute.jit
    def alibi_bwd(grad, scores, b_idx, h_idx, q_idx, kv_idx, seqlen_info, aux_tensors):
        return grad  # d(score + bias)/d(score) = 1

    return (alibi if causal else alibi_symmetric), alibi_bwd


@contextlib.contextmanager
def _every_block():
    """The Hopper kernels computing every visible key block, none skipped past causal ALiBi's reach."""
    from mpt_attention.impl.triton import hopper

    min_keys, hopper.REACH_MIN_KEYS = hopper.REACH_MIN_KEYS, 1 << 62
    try:
        yield
    finally:
        hopper.REACH_MIN_KEYS = min_keys


def _all_blocks(fn):
    """``fn`` whose timed steps, forward and backward, run under ``_every_block`` (``time_provider``)."""
    def run():
        return fn()
    run.around = _every_block
    return run


def _general_kernel(fn):
    """``fn`` run with the Hopper forward kernel disabled (impl/triton/hopper.py)."""
    from mpt_attention.impl.triton import hopper

    def run():
        enabled, hopper.ENABLED = hopper.ENABLED, False
        try:
            return fn()
        finally:
            hopper.ENABLED = enabled
    return run


def make_providers(batch, n_heads, n_kv, seq, head_dim, dtype=torch.bfloat16, dense_bias=True, causal=True):
    """name -> (fn returning the output, list of tensors that get gradients) or an error string;
    ``dense_bias=False`` leaves out ``memeff-dense`` (its (H, S, S) bias is not built); ``causal=False``: the
    noncausal suite (symmetric ALiBi; no MPT bias row, no eager path)."""
    dev = "cuda"
    gen = torch.Generator(device=dev).manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, device=dev, dtype=dtype, generator=gen).requires_grad_()
    q, k, v = rand(batch, seq, n_heads, head_dim), rand(batch, seq, n_kv, head_dim), rand(batch, seq, n_kv, head_dim)
    qh, kh, vh = (x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))
    slopes = M.gen_slopes(n_heads, return_1d=True, device=dev)
    vec_bias = M.build_alibi_bias(n_heads, seq, device=dev)  # (1, H, 1, S) float32, MPT's tensor
    gqa = n_kv != n_heads
    providers = {
        "triton-alibi": (lambda: M.attention(q, k, v, backend="triton", causal=causal, alibi_slopes=slopes),
                         [q, k, v]),
        "triton-alibi-all-blocks": (_all_blocks(lambda: M.attention(q, k, v, backend="triton", causal=causal,
                                                                    alibi_slopes=slopes)), [q, k, v]),
        # the same call with the Hopper (Gluon) forward kernel switched off: the general Triton kernel
        "triton-alibi-general": (_general_kernel(lambda: M.attention(q, k, v, backend="triton", causal=causal,
                                                                     alibi_slopes=slopes)), [q, k, v]),
        "triton": (lambda: M.attention(q, k, v, backend="triton", causal=causal), [q, k, v]),
        "triton-vecbias": (lambda: M.attention(q, k, v, backend="triton", causal=True, attn_bias=vec_bias), [q, k, v]),
        # the price of a bitwise-reproducible backward (issue 4; the default's dQ order is free where that
        # is faster): fwd_bwd only, its forward is the same
        "triton-alibi-deterministic": (lambda: M.attention(q, k, v, backend="triton", causal=causal,
                                                           alibi_slopes=slopes, deterministic=True), [q, k, v]),
    }
    if not causal:
        del providers["triton-vecbias"]
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def sdpa_with(backend, **kw):
        def run():
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(qh, kh, vh, enable_gqa=gqa, **kw)
        return run

    providers["cudnn"] = (sdpa_with(SDPBackend.CUDNN_ATTENTION, is_causal=causal), [qh, kh, vh])
    providers["fa2"] = (sdpa_with(SDPBackend.FLASH_ATTENTION, is_causal=causal), [qh, kh, vh])
    if seq <= 8192 and dense_bias:
        if causal:
            dense = M.build_alibi_bias(n_heads, seq, full=False, device=dev).expand(1, n_heads, seq, seq)
            dense = dense.masked_fill(torch.ones(seq, seq, dtype=torch.bool, device=dev).triu(1), float("-inf"))
        else:  # MPT's full form: -slope * |i - j|
            dense = M.build_alibi_bias(n_heads, seq, full=True, device=dev)
        dense = dense.to(dtype).contiguous()
        providers["memeff-dense"] = (sdpa_with(SDPBackend.EFFICIENT_ATTENTION, attn_mask=dense), [qh, kh, vh])
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        flex = torch.compile(flex_attention, dynamic=False)
        block_mask = None
        if causal:
            block_mask = create_block_mask(lambda b, h, qi, kv: qi >= kv, None, None, seq, seq, device=dev)

        def alibi_mod(score, b, h, qi, kv):
            if causal:
                return score + slopes[h] * (kv - qi)
            return score - slopes[h] * torch.abs(kv - qi)

        providers["flex-alibi"] = (lambda: flex(qh, kh, vh, score_mod=alibi_mod, block_mask=block_mask,
                                                enable_gqa=gqa), [qh, kh, vh])
    except Exception as exc:
        providers["flex-alibi"] = f"{type(exc).__name__}: {exc}"[:200]
    fa4, why = _fa4()
    if fa4 is None:
        providers["fa4"] = providers["fa4-alibi"] = why
    else:
        mod, mod_bwd = _fa4_alibi_mods(n_heads, causal)
        first = lambda out: out[0] if isinstance(out, tuple) else out
        providers["fa4"] = (lambda: first(fa4(q, k, v, causal=causal)), [q, k, v])
        providers["fa4-alibi"] = (lambda: first(fa4(q, k, v, causal=causal, score_mod=mod, score_mod_bwd=mod_bwd)),
                                  [q, k, v])
    if causal and batch * n_heads * seq * seq <= 2**31:
        packed = [x.detach().reshape(batch, seq, -1).requires_grad_() for x in (q, k, v)]
        providers["eager"] = (lambda: M.scaled_multihead_dot_product_attention(
            *packed, n_heads, attn_bias=vec_bias, is_causal=True, kv_n_heads=n_kv)[0], packed)
    return providers


def time_provider(fn, grads, mode):
    """Median ms of ``fn``'s forward (``mode`` "fwd") or forward+backward; inside ``fn.around()`` where it has one."""
    with getattr(fn, "around", contextlib.nullcontext)():
        return _time_provider(fn, grads, mode)


def _time_provider(fn, grads, mode):
    start = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    if time.perf_counter() - start > 0.05:  # a compile or a large first allocation left the card idle
        warm_up(SETTLE_S)
    if mode == "fwd":
        return do_bench(fn, warmup=25, rep=100, return_mode="median")
    dout = torch.randn_like(out)

    def step():
        fn().backward(dout)

    return do_bench(step, warmup=25, rep=100, grad_to_none=grads, return_mode="median")


# ratios measured paired besides the medians (benchmarks/summarize.py's paired columns): our own providers whose
# targets are a few percent, and ours against the FA-class peers the targets name. Where a step is host-bound
# (the S1024 forward+backward) the medians of three rounds follow the host's slow windows, which fall on some
# providers' rounds and not others' (session 63: ours 1.12 / 0.68 / 0.92 ms in its three rounds, flash-attn-4's
# 0.68 / 0.69 / 0.88); interleaved calls see the same windows. Not against FlexAttention: at D128 from 2048 keys the
# ratios to Flex read 7-12% higher paired than from the medians (1.62-3.78 against 1.51-3.39, session 63), where
# FA4's and cuDNN's moved by at most 6%, either way. Ours runs at the H200's 700 W cap (~1790 MHz alone), Flex below it
# (1980 MHz, ~640 W); interleaved, the card's power averages under the cap, the clock holds ~1965 MHz and our calls
# run 6-8% faster than alone while Flex's do not change (benchmarks/pair_clocks.py)
PAIRS = (("triton-alibi", "triton"), ("triton-vecbias", "triton-alibi"), ("triton-alibi", "fa4-alibi"),
         ("triton", "cudnn"))
PAIRED_SAMPLES = 40  # pairs of calls per ratio


def paired_step(fn, grads, mode):
    """One call of provider ``fn`` as ``paired_ratio`` times it, inside ``fn.around()`` where it has one: the forward
    (``mode`` "fwd"), or forward and backward with ``grads``' gradients reset; made after a first call and run once."""
    around = getattr(fn, "around", contextlib.nullcontext)
    with around():
        out = fn()
    dout = torch.randn_like(out) if mode == "fwd_bwd" else None

    def step():
        for x in grads:
            x.grad = None
        with around():
            if dout is None:
                fn()
            else:
                fn().backward(dout)
    step()
    return step


def paired_ratio(a, b, mode, samples=PAIRED_SAMPLES):
    """Provider ``a``'s speed over ``b``'s (their time ``b`` / ``a``) from calls interleaved A B B A A B ..., each
    after the same cache flush as ``do_bench``'s: the median of the per-pair ratios, and its quartiles. Adjacent
    calls share the card's clock, so its drift over a round, which moves the medians of separately timed providers
    by as much as a few-percent target (NOTES.md sessions 32 and 41), cancels; ``a`` and ``b`` are (fn, grads). A
    kernel far below the power cap lifts the clock its partner runs at (benchmarks/pair_clocks.py), so ``PAIRS``
    holds none beside ours."""
    steps = [paired_step(fn, grads, mode) for fn, grads in (a, b)]
    torch.cuda.synchronize()
    flush = torch.empty(256 * 1024 * 1024, dtype=torch.int8, device="cuda")
    events = [[], []]
    for which in interleaved(samples):
        events[which].append(timed_call(steps[which], flush))
    torch.cuda.synchronize()
    return pair_ratios(*([s.elapsed_time(e) for s, e in pairs] for pairs in events))


def timed_call(step, flush):
    """``step()`` after the L2 flush ``do_bench`` does (``flush`` a 256 MB buffer), between the CUDA events returned
    (start, end) and recorded around it."""
    flush.zero_()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    step()
    end.record()
    return start, end


def interleaved(samples):
    """Which of two providers each call times: A B B A A B B A ..., pair k being calls 2k and 2k + 1 (a drift that
    is linear over four calls weighs on both alike)."""
    return [(i + i // 2) % 2 for i in range(2 * samples)]


def pair_ratios(ms_a, ms_b):
    """A's speed over B's per pair (B's ms / A's ms): (median, lower quartile, upper quartile)."""
    ratios = sorted(tb / ta for ta, tb in zip(ms_a, ms_b, strict=True))
    quartile = lambda f: ratios[round(f * (len(ratios) - 1))]  # noqa: E731
    return statistics.median(ratios), quartile(0.25), quartile(0.75)


# seconds of load after a shape's set-up and after a compile, before the next measurement. The H200 runs these
# kernels at its 700 W power limit, and its clock dips when the load resumes after a pause: to 1518-1575 MHz
# about a second in, against 1650-1730 after (benchmarks/window_probe.py --clocks, session 32; each kernel's
# slow windows were these dips). 0.3 s left the first-measured provider of a shape in the dip.
SETTLE_S = 1.5


def warm_up(seconds: float = 2.0) -> None:
    """Busy the GPU before the first measurement: the card idles at a low clock after the tests, and
    the first provider of the first shape measured 20% low in two runs without this. Also (``SETTLE_S``) after
    each shape's set-up and after a provider's first call when that took long (FlexAttention and FA4 compile per
    shape), so that no measurement starts on an idle card or in the clock's dip when the load resumes."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(20):
            a @ a
        torch.cuda.synchronize()


def alternation(names, rounds):
    """The order of a shape's measurements: every provider once per round, each round's order rotated by
    ceil(n / rounds) more, so that a drift of the card's clock over the shape's minute weighs on every provider
    alike and no provider takes a round's first place twice (up to n rounds). The first place reads low: with
    the earlier order (reversed on odd rounds) the first provider, ours with ALiBi, took it in two of three rounds,
    and the suite read ALiBi / no bias 0.95-0.97 and vector bias / slopes 1.01-1.06 at D128 where alternated
    focused runs (bias_row.py) read 0.98-0.99 and 0.97-1.01, one window in a clock dip aside (benchmarks/NOTES.md
    session 32)."""
    names = list(names)
    if not names:
        return []
    step = -(-len(names) // max(1, rounds))
    order = []
    for r in range(rounds):
        shift = r * step % len(names)
        order += names[shift:] + names[:shift]
    return order


def summarize_rounds(samples):
    """A provider's rounds as (median ms, spread = (max - min) / median)."""
    ms = statistics.median(samples)
    return ms, (max(samples) - min(samples)) / ms


def run_main(args, rows, causal=True):
    shapes = MAIN_SHAPES[:2] if args.quick else MAIN_SHAPES
    if args.shapes:
        shapes = [MAIN_SHAPES[int(i)] for i in args.shapes.split(",")]
    suite = "main" if causal else "noncausal"
    warm_up()
    for batch, n_heads, n_kv, seq, head_dim in shapes:
        providers = make_providers(batch, n_heads, n_kv, seq, head_dim, causal=causal)
        warm_up(SETTLE_S)
        shape = f"B{batch} H{n_heads}/{n_kv} S{seq} D{head_dim}"
        for mode in args.modes:
            flops = attention_flops(batch, n_heads, seq, seq, head_dim, causal=causal, mode=mode)
            names = [n for n in providers if not (n.endswith("-deterministic") and mode == "fwd")]
            samples, errors = {n: [] for n in names}, {n: e for n, e in providers.items() if isinstance(e, str)}
            for name in alternation([n for n in names if n not in errors], args.rounds):
                if name in errors:  # failed in an earlier round
                    continue
                try:
                    samples[name].append(time_provider(*providers[name], mode))
                except Exception as exc:
                    errors[name] = f"{type(exc).__name__}: {exc}"[:160]
            for name in names:
                row = dict(suite=suite, shape=shape, mode=mode, provider=name)
                if name in errors:
                    row.update(ms=None, tflops=None, spread=None, note=errors[name])
                else:
                    ms, spread = summarize_rounds(samples[name])
                    row.update(ms=ms, tflops=flops / ms / 1e9, spread=spread, samples_ms=samples[name],
                               note=f"median of {len(samples[name])}" if len(samples[name]) > 1 else "")
                rows.append(row)
                spread = "" if row["spread"] is None else f"spread {row['spread']:.1%}"
                print(f"{shape:24s} {mode:7s} {name:22s} {row['tflops'] or 0:8.1f}  {spread}  {row['note']}",
                      flush=True)
            for num, den in PAIRS:
                if num in samples and den in samples and num not in errors and den not in errors:
                    ratio, low, high = paired_ratio(providers[num], providers[den], mode)
                    rows.append(dict(suite=suite, shape=shape, mode=mode, provider=f"{num} / {den}", ms=None,
                                     tflops=None, spread=None, ratio=ratio, quartiles=[low, high],
                                     note=f"paired: {ratio:.3f} (quartiles {low:.3f}-{high:.3f})"))
                    print(f"{shape:24s} {mode:7s} {num} / {den} {rows[-1]['note']}", flush=True)
            torch.cuda.empty_cache()


def run_extras(args, rows):
    """Dense bias with dbias vs SDPA memory-efficient, and a 50%-padded batch vs running it dense."""
    dev, dtype = "cuda", torch.bfloat16
    batch, n_heads, seq, head_dim = 4, 16, 2048, 128
    gen = torch.Generator(device=dev).manual_seed(1)
    rand = lambda *s: torch.randn(*s, device=dev, dtype=dtype, generator=gen).requires_grad_()
    q, k, v = (rand(batch, seq, n_heads, head_dim) for _ in range(3))
    bias = torch.randn(batch, n_heads, seq, seq, device=dev, dtype=dtype, generator=gen).requires_grad_()
    qh, kh, vh = (x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def memeff():
        with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
            return F.scaled_dot_product_attention(qh, kh, vh, attn_mask=bias)

    flops = attention_flops(batch, n_heads, seq, seq, head_dim, causal=False, mode="fwd_bwd")
    for name, fn, grads in (("triton-dense-dbias", lambda: M.attention(q, k, v, backend="triton", attn_bias=bias),
                             [q, k, v, bias]),
                            ("memeff-dense-dbias", memeff, [qh, kh, vh, bias])):
        try:
            ms = time_provider(fn, grads, "fwd_bwd")
            rows.append(dict(suite="dense-bias", shape=f"B{batch} H{n_heads} S{seq} D{head_dim}", mode="fwd_bwd",
                             provider=name, ms=ms, tflops=flops / ms / 1e9, note="bias (B,H,S,S) with grad"))
        except Exception as exc:
            rows.append(dict(suite="dense-bias", shape="", mode="fwd_bwd", provider=name, ms=None, tflops=None,
                             note=f"{type(exc).__name__}: {exc}"[:160]))
    # 50% padded batch: each row keeps a random half-ish length; real-token FLOPs over time
    batch, seq = 8, 4096
    q, k, v = (torch.randn(batch, seq, n_heads, head_dim, device=dev, dtype=dtype) for _ in range(3))
    lengths = torch.randint(seq // 4, 3 * seq // 4, (batch,), generator=torch.Generator().manual_seed(2))
    kpm = (torch.arange(seq).view(1, seq) < lengths.view(batch, 1)).to(dev)
    slopes = M.gen_slopes(n_heads, return_1d=True, device=dev)
    real = sum(attention_flops(1, n_heads, int(n), int(n), head_dim, causal=True) for n in lengths)
    (qp, kp, vp), (idx, cu, max_len) = [unpad(t, kpm)[0] for t in (q, k, v)], unpad(q, kpm)[1:]

    def varlen():
        return M.attention_varlen(qp, kp, vp, cu, cu, max_len, max_len, backend="triton", causal=True,
                                  alibi_slopes=slopes)

    cu_rows, used, longest = right_padded(kpm)  # once per model step, as the lengths
    flat = [t.flatten(0, 1) for t in (q, k, v)]

    def in_place():  # the padded batch read where it lies: each row a sequence of which ``used`` rows take part
        return M.attention_varlen(*flat, cu_rows, cu_rows, longest, longest, backend="triton", causal=True,
                                  alibi_slopes=slopes, seqused_q=used, seqused_k=used)

    def varlen_with_copies():  # from the padded batch and back, as a model that stays padded would do
        packed = [t.flatten(0, 1).index_select(0, idx) for t in (q, k, v)]
        out = M.attention_varlen(*packed, cu, cu, max_len, max_len, backend="triton", causal=True, alibi_slopes=slopes)
        return pad(out, idx, batch, seq)

    providers = (
        ("triton-varlen", varlen, "packed (cu_seqlens), no padded row computed"),
        ("triton-varlen+unpad/pad", varlen_with_copies, "padded in and out: gathers and the scatter counted"),
        ("triton-in-place", in_place, "the padded batch as sequences with seqused, no copies"),
        ("triton-padded", lambda: M.attention(q, k, v, backend="triton", causal=True, alibi_slopes=slopes,
                                              key_padding_mask=kpm),
         "key_padding_mask (Hopper: a bias row and K, V copies; general kernels: padded keys skipped)"),
        ("triton-dense", lambda: M.attention(q, k, v, backend="triton", causal=True, alibi_slopes=slopes),
         "the padded batch run dense"),
    )
    for name, fn, what in providers:
        ms = do_bench(fn, warmup=25, rep=100, return_mode="median")
        rows.append(dict(suite="padding", shape=f"B{batch} H{n_heads} S{seq} D{head_dim} ~50% pad", mode="fwd",
                         provider=name, ms=ms, tflops=real / ms / 1e9, note=f"real-token TFLOP/s; {what}"))
        if name in ("triton-varlen", "triton-in-place", "triton-dense"):
            # replayed from a CUDA graph: the GPU's time alone (an eager forward of ~0.3-0.8 ms is about the host's
            # time per call on the H200 machine, benchmarks/NOTES.md session 46)
            graph, _ = capture_cuda_graph(fn)
            ms = do_bench(graph.replay, warmup=25, rep=100, return_mode="median")
            del graph
            rows.append(dict(suite="padding", shape=f"B{batch} H{n_heads} S{seq} D{head_dim} ~50% pad", mode="fwd",
                             provider=f"{name}-graph", ms=ms, tflops=real / ms / 1e9,
                             note="real-token TFLOP/s, CUDA graph replay"))
    # forward+backward: packed, masked and dense
    grads = [t.requires_grad_() for t in (q, k, v, qp, kp, vp)]
    flat[:] = [t.flatten(0, 1) for t in (q, k, v)]  # views of the tensors that now require gradients
    for name, fn, inputs in (("triton-varlen", varlen, grads[3:]), ("triton-in-place", in_place, grads[:3]),
                             ("triton-padded", lambda: M.attention(q, k, v, backend="triton", causal=True,
                                                                   alibi_slopes=slopes, key_padding_mask=kpm),
                              grads[:3]),
                             ("triton-dense", lambda: M.attention(q, k, v, backend="triton", causal=True,
                                                                  alibi_slopes=slopes), grads[:3])):
        ms = time_provider(fn, inputs, "fwd_bwd")
        rows.append(dict(suite="padding", shape=f"B{batch} H{n_heads} S{seq} D{head_dim} ~50% pad", mode="fwd_bwd",
                         provider=name, ms=ms, tflops=3.5 * real / ms / 1e9, note="real-token TFLOP/s"))


def run_packed(rows):
    """8 sequences of 2048 packed into one 16k row (sequence_id) against attending over the whole row: each call
    timed eagerly (what a loop of single calls sees; the packed calls' host path, ~0.25-0.5 ms on the H200 machine's
    CPU, is about their kernel's time, so these cells move with the host: benchmarks/NOTES.md session 46) and replayed
    from a CUDA graph (the kernels' rate). Under capture ``sequence_id`` is not read on the host, so that call's
    replay runs the masked whole row (packed_rows.py)."""
    dev, dtype, heads, head_dim, seq, n_seq = "cuda", torch.bfloat16, 16, 128, 16384, 8
    q, k, v = (torch.randn(1, seq, heads, head_dim, device=dev, dtype=dtype) for _ in range(3))
    seq_id = torch.arange(seq, device=dev).div(seq // n_seq, rounding_mode="floor").view(1, seq)
    slopes = M.gen_slopes(heads, return_1d=True, device=dev)
    real = n_seq * attention_flops(1, heads, seq // n_seq, seq // n_seq, head_dim, causal=True)
    cu, max_len = cu_seqlens_from_sequence_id(seq_id)
    flat = [t.flatten(0, 1) for t in (q, k, v)]
    providers = (
        ("triton-packed", lambda: M.attention(q, k, v, backend="triton", causal=True, alibi_slopes=slopes,
                                              sequence_id=seq_id)),
        ("triton-packed-as-varlen", lambda: M.attention_varlen(*flat, cu, cu, max_len, max_len, backend="triton",
                                                                causal=True, alibi_slopes=slopes)),
        ("triton-whole-row", lambda: M.attention(q, k, v, backend="triton", causal=True, alibi_slopes=slopes)),
    )
    shape = f"B1 H{heads} S{seq} D{head_dim} {n_seq} seqs"
    for name, fn in providers:
        ms = do_bench(fn, warmup=25, rep=100, return_mode="median")
        rows.append(dict(suite="packed", shape=shape, mode="fwd", provider=name, ms=ms, tflops=real / ms / 1e9,
                         note="real-token TFLOP/s, eager"))
        graph, _ = capture_cuda_graph(fn)
        ms = do_bench(graph.replay, warmup=25, rep=100, return_mode="median")
        del graph
        rows.append(dict(suite="packed", shape=shape, mode="fwd", provider=f"{name}-graph", ms=ms,
                         tflops=real / ms / 1e9, note="real-token TFLOP/s, CUDA graph replay"))


def write_outputs(rows, out_dir, meta):
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    with open(os.path.join(out_dir, "results.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["suite", "shape", "mode", "provider", "ms", "tflops", "spread",
                                                "note"], extrasaction="ignore")  # per-round samples: JSON only
        writer.writeheader()
        writer.writerows(rows)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        main = [r for r in rows if r["suite"] == "main" and r["tflops"]]
        modes = sorted({r["mode"] for r in main})
        if not modes:
            return
        fig, axes = plt.subplots(1, len(modes), figsize=(8 * len(modes), 5), squeeze=False)
        for ax, mode in zip(axes[0], modes):
            shapes = list(dict.fromkeys(r["shape"] for r in main if r["mode"] == mode))
            names = list(dict.fromkeys(r["provider"] for r in main if r["mode"] == mode))
            width = 0.8 / max(1, len(names))
            for i, name in enumerate(names):
                vals = [next((r["tflops"] for r in main
                              if r["mode"] == mode and r["shape"] == s and r["provider"] == name), 0)
                        for s in shapes]
                ax.bar([j + i * width for j in range(len(shapes))], vals, width, label=name)
            ax.set_xticks([j + 0.4 for j in range(len(shapes))], shapes, rotation=20, fontsize=7)
            ax.set_ylabel("TFLOP/s")
            ax.set_title(f"causal bf16 {mode} on {meta['gpu']}")
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "tflops.png"), dpi=110)
    except Exception as exc:  # the numbers matter more than the picture
        print("plot failed:", exc)


def print_table(rows):
    print("\n| suite | shape | mode | provider | ms | TFLOP/s | note |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        ms = f"{r['ms']:.3f}" if r["ms"] else "-"
        tf = f"{r['tflops']:.1f}" if r["tflops"] else "-"
        print(f"| {r['suite']} | {r['shape']} | {r['mode']} | {r['provider']} | {ms} | {tf} | {r['note'][:60]} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="bench-out")
    parser.add_argument("--modes", default="fwd,fwd_bwd")
    parser.add_argument("--suite", default="main,extras")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--shapes", help="comma-separated indices into MAIN_SHAPES (default: all; --quick: 0,1)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="main suite: measurements per provider, alternated; the median is reported")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    args.modes = args.modes.split(",")
    commit = os.environ.get("GIT_COMMIT") or subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip() or "unknown"
    import triton

    meta = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__, commit=commit,
                date=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    print(meta, flush=True)
    rows = []
    try:
        if "main" in args.suite:
            run_main(args, rows)
        if "noncausal" in args.suite:
            run_main(args, rows, causal=False)
        if "extras" in args.suite:
            run_extras(args, rows)
            run_packed(rows)
    finally:
        write_outputs(rows, args.out, meta)
        print_table(rows)


if __name__ == "__main__":
    sys.exit(main())
