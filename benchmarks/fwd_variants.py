"""Which forward-kernel ingredients pay on this GPU: a stripped causal-ALiBi forward with switches.

    python benchmarks/fwd_variants.py       (GPU; prints a table, slowest first, library kernel and cuDNN included)

The library kernel (impl/triton/forward.py) carries masks, bias, dropout and varlen; this one only the
dense causal ALiBi path, so each switch's effect is measured alone before it goes into the library:
ACC_DOT (accumulate P @ V inside the dot), TMA (K/V through tensor descriptors), WS (warp-specialised
loop), MASKED_LOADS (the library's predicated K/V loads in the unmasked blocks). Each variant is checked
against the library's output first; a variant that disagrees is reported and not timed.
"""

from __future__ import annotations

import itertools
import sys

import torch
import triton
import triton.language as tl
from triton.testing import do_bench

import mpt_attention as M
from mpt_attention.testing import attention_flops

LOG2E = 1.4426950408889634


@triton.jit
def _tile(acc, l_i, m_i, q, k, v, cols, rows, slope2, qk_scale2, seqlen,
          MASK: tl.constexpr, ACC_DOT: tl.constexpr):
    # [BLOCK_M, BLOCK_N]
    s = tl.dot(q, tl.trans(k)) * qk_scale2 + (slope2 * (cols - (seqlen - 1)).to(tl.float32))[None, :]
    if MASK:
        s = tl.where(cols[None, :] <= rows[:, None], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.math.exp2(s - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    if ACC_DOT:
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc)
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return acc, l_i, m_new


@triton.jit
def _fwd_variant(
    Q, K, V, Out, Slopes,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
    n_heads, n_groups, seqlen, qk_scale2,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
    ACC_DOT: tl.constexpr, TMA: tl.constexpr, WS: tl.constexpr, MASKED_LOADS: tl.constexpr,
):
    start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
    bh = tl.program_id(1)
    b, h = bh // n_heads, bh % n_heads
    kv_h = h // n_groups
    offs_m, offs_n, offs_d = tl.arange(0, BLOCK_M), tl.arange(0, BLOCK_N), tl.arange(0, HEAD_DIM)
    rows = start_m + offs_m
    q_ptrs = Q + b.to(tl.int64) * stride_qb + h * stride_qh + rows.to(tl.int64)[:, None] * stride_qs + offs_d[None, :]
    q = tl.load(q_ptrs, mask=(rows < seqlen)[:, None], other=0.0)
    k_base = K + b.to(tl.int64) * stride_kb + kv_h * stride_kh
    v_base = V + b.to(tl.int64) * stride_kb + kv_h * stride_kh
    slope2 = tl.load(Slopes + h) * 1.4426950408889634
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    if TMA:
        k_desc = tl.make_tensor_descriptor(k_base, shape=[seqlen, HEAD_DIM], strides=[stride_ks, 1],
                                           block_shape=[BLOCK_N, HEAD_DIM])
        v_desc = tl.make_tensor_descriptor(v_base, shape=[seqlen, HEAD_DIM], strides=[stride_ks, 1],
                                           block_shape=[BLOCK_N, HEAD_DIM])
    full = tl.minimum(start_m + 1, seqlen) // BLOCK_N * BLOCK_N
    for start_n in tl.range(0, full, BLOCK_N, warp_specialize=WS):
        cols = start_n + offs_n
        if TMA:
            k = k_desc.load([start_n, 0])
            v = v_desc.load([start_n, 0])
        elif MASKED_LOADS:
            ok = (cols < seqlen)[:, None] & (offs_d < HEAD_DIM)[None, :]
            k = tl.load(k_base + cols.to(tl.int64)[:, None] * stride_ks + offs_d[None, :], mask=ok, other=0.0)
            v = tl.load(v_base + cols.to(tl.int64)[:, None] * stride_ks + offs_d[None, :], mask=ok, other=0.0)
        else:
            k = tl.load(k_base + cols.to(tl.int64)[:, None] * stride_ks + offs_d[None, :])
            v = tl.load(v_base + cols.to(tl.int64)[:, None] * stride_ks + offs_d[None, :])
        acc, l_i, m_i = _tile(acc, l_i, m_i, q, k, v, cols, rows, slope2, qk_scale2, seqlen, False, ACC_DOT)
    for start_n in range(full, tl.minimum(start_m + BLOCK_M, seqlen), BLOCK_N):
        cols = start_n + offs_n
        ok = (cols < seqlen)[:, None]
        k = tl.load(k_base + cols.to(tl.int64)[:, None] * stride_ks + offs_d[None, :], mask=ok, other=0.0)
        v = tl.load(v_base + cols.to(tl.int64)[:, None] * stride_ks + offs_d[None, :], mask=ok, other=0.0)
        acc, l_i, m_i = _tile(acc, l_i, m_i, q, k, v, cols, rows, slope2, qk_scale2, seqlen, True, ACC_DOT)
    out = acc / l_i[:, None]
    o_ptrs = Out + b.to(tl.int64) * stride_qb + h * stride_qh + rows.to(tl.int64)[:, None] * stride_qs + offs_d[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=(rows < seqlen)[:, None])


def run_variant(q, k, v, slopes, flags, cfg):
    batch, seq, n_heads, head_dim = q.shape
    out = torch.empty_like(q)
    grid = (triton.cdiv(seq, cfg["BLOCK_M"]), batch * n_heads)
    _fwd_variant[grid](q, k, v, out, slopes, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1),
                       k.stride(2), n_heads, n_heads // k.shape[2], seq, head_dim ** -0.5 * LOG2E,
                       HEAD_DIM=head_dim, **flags, **cfg)
    return out


def main() -> int:
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
    shapes = [(2, 16, 16, 8192, 128), (8, 16, 16, 2048, 128), (4, 32, 32, 4096, 64)]
    variants = [dict(ACC_DOT=a, TMA=t, WS=w, MASKED_LOADS=m) for a, t, w, m in (
        (False, False, False, False), (False, False, False, True), (True, False, False, False),
        (True, False, False, True), (True, True, False, False), (True, False, True, False), (True, True, True, False))]
    configs = {128: [(64, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2)],
               64: [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3)]}
    rows = []
    for batch, n_heads, n_kv, seq, head_dim in shapes:
        q, k, v = (torch.randn(batch, seq, h, head_dim, device="cuda", dtype=torch.bfloat16)
                   for h in (n_heads, n_kv, n_kv))
        slopes = M.gen_slopes(n_heads, return_1d=True, device="cuda").float()
        flops = attention_flops(batch, n_heads, seq, seq, head_dim, causal=True)
        shape = f"B{batch} H{n_heads} S{seq} D{head_dim}"
        expect = M.attention(q, k, v, backend="triton", causal=True, alibi_slopes=slopes)
        lib = do_bench(lambda: M.attention(q, k, v, backend="triton", causal=True, alibi_slopes=slopes),
                       warmup=25, rep=100, return_mode="median")
        rows.append((shape, "library kernel", "", flops / lib / 1e9))
        qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def cudnn():
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                return torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, is_causal=True)

        cudnn_ms = do_bench(cudnn, warmup=25, rep=100, return_mode="median")
        rows.append((shape, "cudnn (no bias)", "", flops / cudnn_ms / 1e9))
        for flags, c in itertools.product(variants, configs[head_dim]):
            if flags["WS"] and c[2] < 8:  # Triton's Hopper warp specialisation needs two warpgroups
                continue
            cfg = dict(BLOCK_M=c[0], BLOCK_N=c[1], num_warps=c[2], num_stages=c[3])
            name = " ".join(key for key, on in flags.items() if on) or "plain"
            try:
                out = run_variant(q, k, v, slopes, flags, cfg)
                err = (out.float() - expect.float()).abs().max().item()
                if not err < 2e-2:
                    rows.append((shape, name, str(c), float("nan")))
                    print(f"{shape} {name} {c}: WRONG (max diff {err:.3g})", flush=True)
                    continue
                ms = do_bench(lambda: run_variant(q, k, v, slopes, flags, cfg), warmup=25, rep=100,
                              return_mode="median")
                rows.append((shape, name, str(c), flops / ms / 1e9))
            except Exception as exc:  # a switch this Triton cannot compile is a result too
                print(f"{shape} {name} {c}: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
    print("\n| shape | variant | (BM, BN, warps, stages) | TFLOP/s |\n|---|---|---|---|")
    for shape in dict.fromkeys(r[0] for r in rows):
        for r in sorted((r for r in rows if r[0] == shape), key=lambda r: -1 if r[3] != r[3] else r[3]):
            print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
