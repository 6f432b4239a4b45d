"""First look on the GPU: correctness of every feature in bf16 and a quick timing against SDPA."""
import torch
import triton
import mpt_attention as M
from triton.testing import do_bench
torch.manual_seed(0)
dev = "cuda"
print(torch.cuda.get_device_name(), torch.__version__, triton.__version__)
def rel(a, b): return ((a.float() - b.float()).norm() / b.float().norm()).item()
B, S, H, Hkv, D = 2, 1000, 8, 2, 128
for D in (64, 128, 80, 256):
    q = torch.randn(B, S, H, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(B, S, Hkv, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(B, S, Hkv, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
    slopes = M.gen_slopes(H, return_1d=True, device=dev)
    bias = torch.randn(1, H, 1, S, device=dev, requires_grad=True)
    kpm = torch.rand(B, S, device=dev) > 0.3
    for kw in (dict(causal=True), dict(causal=True, alibi_slopes=slopes), dict(attn_bias=bias, key_padding_mask=kpm)):
        do = torch.randn_like(q)
        ins = [q, k, v] + ([bias] if "attn_bias" in kw else [])
        o1 = M.attention(q, k, v, backend="triton", **kw)
        g1 = torch.autograd.grad(o1, ins, do)
        o2 = M.attention(q, k, v, backend="torch", **kw)
        g2 = torch.autograd.grad(o2, ins, do)
        print(D, list(kw), f"out {rel(o1, o2):.1e}", "grads", " ".join(f"{rel(a, b):.1e}" for a, b in zip(g1, g2)))
for (B, H, S, D) in ((8, 16, 2048, 128), (4, 32, 4096, 64)):
    q, k, v = (torch.randn(B, S, H, D, device=dev, dtype=torch.bfloat16) for _ in range(3))
    slopes = M.gen_slopes(H, return_1d=True, device=dev)
    flops = 4 * B * H * S * S * D / 2
    t_tri = do_bench(lambda: M.attention(q, k, v, backend="triton", causal=True, alibi_slopes=slopes),
                     return_mode="median")
    t_tri0 = do_bench(lambda: M.attention(q, k, v, backend="triton", causal=True), return_mode="median")
    qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))
    t_sdpa = do_bench(lambda: torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, is_causal=True),
                      return_mode="median")
    print(f"B{B} H{H} S{S} D{D}: triton+alibi {flops/t_tri/1e9:.0f} TFLOP/s, triton {flops/t_tri0/1e9:.0f}, "
          f"sdpa(default) {flops/t_sdpa/1e9:.0f}")
