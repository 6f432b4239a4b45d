"""The suite's host-bound cell in isolation: B16 H16 S1024 D128 causal forward+backward, timed as
bench_attention.py times a provider (``time_provider``), in several orders, with Python's collector on and off.

    PYTHONPATH=src python3 benchmarks/order_probe.py

In sessions 51 and 62 the suite read ``triton-alibi`` there at 0.89-1.09 ms in every round against 0.76-0.82 for
``triton-alibi-all-blocks``, the same kernels and host path below ``hopper.REACH_MIN_KEYS`` (benchmarks/NOTES.md
session 62). Each line: the providers in the order timed, ms each; ``gc off``: the collector disabled meanwhile."""
import gc
import sys

sys.path.insert(0, "benchmarks")
import torch
import bench_attention as B
import mpt_attention as M

b, h, s, d = 16, 16, 1024, 128
gen = torch.Generator(device="cuda").manual_seed(0)
rand = lambda *shape: torch.randn(*shape, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_()
q, k, v = rand(b, s, h, d), rand(b, s, h, d), rand(b, s, h, d)
slopes = M.gen_slopes(h, return_1d=True, device="cuda")
vec_bias = M.build_alibi_bias(h, s, device="cuda")
packed = [x.detach().reshape(b, s, -1).requires_grad_() for x in (q, k, v)]
P = {
    "alibi": (lambda: M.attention(q, k, v, backend="triton", causal=True, alibi_slopes=slopes), [q, k, v]),
    "allb": (B._all_blocks(lambda: M.attention(q, k, v, backend="triton", causal=True, alibi_slopes=slopes)), [q, k, v]),
    "alibi2": (lambda: M.attention(q, k, v, backend="triton", causal=True, alibi_slopes=slopes), [q, k, v]),
    "nobias": (lambda: M.attention(q, k, v, backend="triton", causal=True), [q, k, v]),
    "eager": (lambda: M.scaled_multihead_dot_product_attention(*packed, h, attn_bias=vec_bias, is_causal=True,
                                                               kv_n_heads=h)[0], packed),
}
for name in P:  # compile
    B.time_provider(*P[name], "fwd_bwd")
B.warm_up(2)
orders = [["alibi", "allb", "alibi", "allb", "alibi2", "nobias"], ["eager", "alibi", "allb"], ["eager", "allb", "alibi"],
          ["allb", "alibi", "alibi2"], ["nobias", "alibi", "nobias"]]
for gc_off in (False, True):
    for order in orders:
        if gc_off:
            gc.collect(); gc.disable()
        ms = [B.time_provider(*P[n], "fwd_bwd") for n in order]
        gc.enable()
        print(("gc off " if gc_off else "") + "  ".join(f"{n} {t:.3f}" for n, t in zip(order, ms)), flush=True)
print("gc counts", gc.get_count(), gc.get_threshold())
