"""SM clock and board power while one forward+backward runs in a loop, for benchmarks/NOTES.md: why the
no-bias fwd+bwd runs slower than the ALiBi one on the same kernels.

    python benchmarks/power_clocks.py

B1 H16 S16384 D128 causal bf16, ``triton`` backend, each variant for a few seconds while ``nvidia-smi``
is sampled every 0.1 s (the first quarter of the samples dropped as ramp-up): no bias, ALiBi, and ALiBi
with every slope 0 (the ALiBi code path with the no-bias scores, so no probabilities underflow to 0).
"""

import subprocess
import threading
import time

import torch

import mpt_attention as M

SHAPE = (1, 16, 16384, 128)  # B, H, S, D


def sample_clocks(stop: threading.Event, out: list) -> None:
    while not stop.is_set():
        line = subprocess.run(["nvidia-smi", "--query-gpu=clocks.sm,power.draw", "--format=csv,noheader,nounits"],
                              capture_output=True, text=True).stdout.strip()
        out.append(tuple(float(x) for x in line.split(",")))
        time.sleep(0.1)


def run(alibi: bool, zero_slopes: bool = False, seconds: float = 4.0) -> None:
    batch, heads, seq, dim = SHAPE
    q, k, v = (torch.randn(batch, seq, heads, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    slopes = M.gen_slopes(heads, return_1d=True, device="cuda") if alibi else None
    if zero_slopes:
        slopes = torch.zeros_like(slopes)
    dout = torch.randn_like(q)

    def step():
        M.attention(q, k, v, backend="triton", causal=True, alibi_slopes=slopes).backward(dout)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    stop, samples = threading.Event(), []
    sampler = threading.Thread(target=sample_clocks, args=(stop, samples))
    sampler.start()
    steps, start = 0, time.time()
    while time.time() - start < seconds:
        step()
        steps += 1
        if steps % 5 == 0:  # keep the queue short so the samples cover the timed steps
            torch.cuda.synchronize()
    torch.cuda.synchronize()
    elapsed = time.time() - start
    stop.set()
    sampler.join()
    kept = samples[len(samples) // 4:]
    clock = sum(s[0] for s in kept) / len(kept)
    power = sum(s[1] for s in kept) / len(kept)
    print(f"alibi={alibi} zero_slopes={zero_slopes}: {elapsed / steps * 1e3:.2f} ms/iter, sm clock {clock:.0f} MHz, "
          f"power {power:.0f} W ({len(kept)} samples)", flush=True)


def main() -> None:
    for args in [(False,), (True,), (True, True), (False,), (True,)]:
        run(*args)


if __name__ == "__main__":
    main()
