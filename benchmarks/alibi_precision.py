"""Float32 causal ALiBi's error at length in the kernels' two forms (benchmarks/NOTES.md session 45):

    python benchmarks/alibi_precision.py [--lengths 2048,4096] [--device cuda]

Inputs: N(0, 1), B1, D64, four of MPT's 16 heads' slopes (alibi_bias_max 8: 2^-0.5, 2^-2, 2^-4, 2^-8). The
general kernels' float32 out, log-sum-exp and gradients of ``out * dout + lse * dlse`` are compared with the float64
reference, and each error is printed with its ratio to torch's float32 error. The tests' rule allows 2x plus 1e-5.
Two forms are run: ALiBi measured from each row's diagonal (the kernels' form since session 45), and MPT's own
``slope * (j - (S_k - 1))``, chosen by switching ``alibi_from_diagonal`` off in ``ops`` and ``launch``.
A precision probe: nothing is timed.
"""

import argparse
import contextlib

import torch

import mpt_attention as M
from mpt_attention import ops
from mpt_attention.impl.triton import launch
from mpt_attention.testing import reference_attention

NAMES = ("out", "lse", "dq", "dk", "dv")
HEADS = [0, 3, 7, 15]  # of MPT's 16: slopes 2^-0.5, 2^-2, 2^-4, 2^-8


@contextlib.contextmanager
def mpt_form():
    """The kernels in MPT's own causal form: no diagonal, and so no conversion of the log-sum-exp."""
    saved = ops.alibi_from_diagonal, launch.alibi_from_diagonal
    ops.alibi_from_diagonal = launch.alibi_from_diagonal = lambda *args: False
    try:
        yield
    finally:
        ops.alibi_from_diagonal, launch.alibi_from_diagonal = saved


def results(inputs, dout, dlse, kw, backend=None, dtype=torch.float32):
    """out, lse and the gradients of ``out * dout + lse * dlse``, in ``dtype`` (the reference's compute dtype)."""
    xs = [x.detach().to(dtype).requires_grad_() for x in inputs]
    if backend:
        out, lse = M.attention(*xs, backend=backend, return_lse=True, **kw)
    else:
        out, lse = reference_attention(*xs, compute_dtype=dtype, **kw)
    grads = torch.autograd.grad([out, lse], xs, [dout.to(dtype), dlse.to(dtype)])
    return [t.detach().double() for t in (out, lse, *grads)]


def measure(s_q, s_k, device):
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(1, n, len(HEADS), 64, device=device, generator=gen) for n in (s_q, s_k, s_k))
    slopes = M.gen_slopes(16, return_1d=True, device=device).flatten()[HEADS].float()
    kw = dict(causal=True, alibi_slopes=slopes)
    dout = torch.randn(q.shape, device=device, generator=gen)
    dlse = torch.randn(1, len(HEADS), s_q, device=device, generator=gen)
    ref = results((q, k, v), dout, dlse, kw, dtype=torch.float64)
    low = [(a - b).abs().max().item() for a, b in zip(results((q, k, v), dout, dlse, kw), ref)]
    rows = []
    for form, context in (("diagonal", contextlib.nullcontext()), ("MPT's", mpt_form())):
        with context:
            got = results((q, k, v), dout, dlse, kw, backend="triton")
        errs = [(a - b).abs().max().item() for a, b in zip(got, ref)]
        rows.append((form, errs))
    return low, rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="2048,4096", help="comma-separated S (S_q = S_k)")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    print("| S | form | " + " | ".join(f"{n} err (x torch fp32)" for n in NAMES) + " |")
    print("|---|---|" + "---|" * len(NAMES))
    for seq in (int(s) for s in args.lengths.split(",")):
        low, rows = measure(seq, seq, args.device)
        print(f"| {seq} | torch float32 | " + " | ".join(f"{e:.2e}" for e in low) + " |")
        for form, errs in rows:
            cells = (f"{e:.2e} ({e / max(lo, 1e-30):.2f}x)" for e, lo in zip(errs, low))
            print(f"| {seq} | {form} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
