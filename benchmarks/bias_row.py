"""MPT's (1, H, 1, S) bias tensor against ALiBi slopes, forward, on the GPU (benchmarks/NOTES.md):

    python benchmarks/bias_row.py [--mode fwd_bwd]

Per shape (bf16, causal), TFLOP/s of: ALiBi from slopes, MPT's bias row in float32 (as
``build_alibi_bias`` makes it) and in bf16 (as MPT casts it), the float32 row through the general
kernel (the Hopper kernels off), and no bias; then the bias row's ratios to slopes (target >= 0.97).
``--mode fwd_bwd``: forward and backward (q, k, v need gradients; the bias does not, as in MPT).
``--kernels``: instead, each GPU kernel's time inside one forward+backward (``--mode fwd``: one forward), slopes
against the float32 row.
``--variants slopes,no-bias``: only those columns (an A/B of one path compiles and times less; also
``slopes-general``, ``no-bias-general``: the general kernel, which the default columns leave out);
``--shape B,H,H_KV,S,D`` (repeatable): those shapes instead of the four below.
``--non-causal``: without the causal mask (ALiBi's symmetric form -slope * |i - j| from slopes; the bias row is
MPT's causal form either way).
``slopes-all-blocks``, ``row-fp32-all-blocks``: every visible key block computed (``hopper.REACH_MIN_KEYS`` past the
length: the blocks past causal ALiBi's reach, ``reach.py``, are not skipped); the default columns include them. The
ratios: the bias row against slopes with both skipping, and with both computing every block.
``--norm-scale X``: q and k drawn with standard deviation X instead of 1 (larger norms: a longer reach).
``--reach-min-keys N``: the skipping columns take the reach from N keys (``hopper.REACH_MIN_KEYS``; a training step
from N / 2), e.g. to time a forward alone at 2048 keys with it.
``--grad-inputs``: the forward on q, k, v that require gradients, as ``bench_attention.py``'s suite times it (the
op then records its autograd node and saves its tensors); its D64 cells read ~3.5% below this script's
(benchmarks/NOTES.md session 37).
"""

import argparse

import torch
from triton.testing import do_bench

import mpt_attention as M
from mpt_attention.impl.triton import hopper
from mpt_attention.testing import attention_flops, profile_kernels

SHAPES = [(8, 16, 16, 2048, 128), (2, 16, 16, 8192, 128), (4, 32, 32, 4096, 64), (2, 32, 4, 8192, 128)]


def measure(batch, n_heads, n_kv, seq, head_dim, mode="fwd", only=None, causal=True, grad_inputs=False, norm_scale=1.0):
    grad = mode == "fwd_bwd"
    q, k, v = ((torch.randn(batch, seq, h, head_dim, device="cuda") * scale).to(torch.bfloat16)
               .requires_grad_(grad or grad_inputs)
               for h, scale in ((n_heads, norm_scale), (n_kv, norm_scale), (n_kv, 1.0)))
    dout = torch.randn_like(q)
    slopes = M.gen_slopes(n_heads, return_1d=True, device="cuda")
    row = M.build_alibi_bias(n_heads, seq, device="cuda")
    variants = {"slopes": ({"alibi_slopes": slopes}, True), "slopes-all-blocks": ({"alibi_slopes": slopes}, None),
                "row-fp32": ({"attn_bias": row}, True), "row-bf16": ({"attn_bias": row.to(torch.bfloat16)}, True),
                "row-fp32-all-blocks": ({"attn_bias": row}, None),
                "row-fp32-general": ({"attn_bias": row}, False), "no-bias": ({}, True),
                "slopes-general": ({"alibi_slopes": slopes}, False), "no-bias-general": ({}, False)}
    if only:
        variants = {name: variants[name] for name in only}
    else:  # the general kernel's own columns only when asked for
        variants = {name: v for name, v in variants.items() if name not in ("slopes-general", "no-bias-general")}
    flops = attention_flops(batch, n_heads, seq, seq, head_dim, causal=causal, mode=mode)
    tflops = {}

    def step(kw):
        out = M.attention(q, k, v, backend="triton", causal=causal, **kw)
        if grad:
            torch.autograd.grad(out, [q, k, v], dout)

    reach_min_keys = hopper.REACH_MIN_KEYS
    for name, (kw, use_hopper) in variants.items():
        hopper.ENABLED = use_hopper is not False
        hopper.REACH_MIN_KEYS = reach_min_keys if use_hopper is not None else 1 << 62  # None: every block
        ms = do_bench(lambda kw=kw: step(kw), warmup=25, rep=100, return_mode="median")
        tflops[name] = flops / ms / 1e9
    hopper.ENABLED, hopper.REACH_MIN_KEYS = True, reach_min_keys
    # the bias row against slopes, both skipping past their reach (reach.py) and both computing every block
    pairs = (("row-fp32", "slopes"), ("row-bf16", "slopes"), ("row-fp32-all-blocks", "slopes-all-blocks"),
             ("slopes", "slopes-all-blocks"))
    ratios = "  ".join(f"{a} / {b} {tflops[a] / tflops[b]:.3f}" for a, b in pairs if a in tflops and b in tflops)
    label = f"{mode}{'' if causal else ' non-causal'} B{batch} H{n_heads}/{n_kv} S{seq} D{head_dim}"
    print(f"{label}  " + "  ".join(f"{n} {t:.0f}" for n, t in tflops.items())
          + (f"  | {ratios}" if ratios else ""), flush=True)


KERNEL_VARIANTS = ("slopes", "slopes-all-blocks", "row-fp32", "no-bias", "row-fp32-all-blocks")


def kernels(batch, n_heads, n_kv, seq, head_dim, mode="fwd_bwd", only=None):
    """Where a forward+backward's (or a forward's) time goes with slopes and with the float32 bias row (``only``:
    those of ``KERNEL_VARIANTS``)."""
    q = torch.randn(batch, seq, n_heads, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(batch, seq, n_kv, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            for _ in range(2))
    dout = torch.randn_like(q)
    slopes = M.gen_slopes(n_heads, return_1d=True, device="cuda")
    variants = {"slopes": {"alibi_slopes": slopes}, "slopes-all-blocks": {"alibi_slopes": slopes},
                "row-fp32": {"attn_bias": M.build_alibi_bias(n_heads, seq, device="cuda")}, "no-bias": {}}
    variants["row-fp32-all-blocks"] = variants["row-fp32"]
    assert tuple(variants) == KERNEL_VARIANTS
    reach_min_keys = hopper.REACH_MIN_KEYS
    for name in only or ("slopes", "row-fp32"):
        kw = variants[name]
        hopper.REACH_MIN_KEYS = 1 << 62 if name.endswith("all-blocks") else reach_min_keys
        def step(kw=kw):
            out = M.attention(q, k, v, backend="triton", causal=True, **kw)
            if mode == "fwd_bwd":
                torch.autograd.grad(out, [q, k, v], dout)
        print(f"== {mode} kernels, B{batch} H{n_heads}/{n_kv} S{seq} D{head_dim}, {name}")
        for ms, count, kernel in profile_kernels(step)[:8]:
            print(f"  {ms:8.3f} ms/step  {count:3d}x  {kernel[:90]}", flush=True)
    hopper.REACH_MIN_KEYS = reach_min_keys


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=["fwd", "fwd_bwd"], default="fwd")
    parser.add_argument("--kernels", action="store_true", help="per-kernel times of one step instead")
    parser.add_argument("--variants", help="comma-separated columns to time (default: all)")
    parser.add_argument("--shape", action="append", help="B,H,H_KV,S,D (repeatable; default: the four SHAPES)")
    parser.add_argument("--non-causal", action="store_true", help="no causal mask (symmetric ALiBi)")
    parser.add_argument("--grad-inputs", action="store_true", help="forward on inputs that require gradients")
    parser.add_argument("--norm-scale", type=float, default=1.0, help="standard deviation of q and k (default 1)")
    parser.add_argument("--reach-min-keys", type=int, help="hopper.REACH_MIN_KEYS for the skipping columns")
    args = parser.parse_args()
    if args.reach_min_keys:
        hopper.REACH_MIN_KEYS = args.reach_min_keys
    only = args.variants.split(",") if args.variants else None
    unknown = [name for name in only or () if args.kernels and name not in KERNEL_VARIANTS]
    if unknown:
        parser.error(f"--kernels times {', '.join(KERNEL_VARIANTS)}; not {', '.join(unknown)}")
    shapes = [tuple(int(x) for x in text.split(",")) for text in args.shape] if args.shape else SHAPES
    for shape in shapes:
        if args.kernels:
            kernels(*shape, mode=args.mode, only=only)
        else:
            measure(*shape, mode=args.mode, only=only, causal=not args.non_causal, grad_inputs=args.grad_inputs,
                    norm_scale=args.norm_scale)


if __name__ == "__main__":
    main()
