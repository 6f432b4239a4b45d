"""Packed sequences (``attention_varlen``) on the GPU: the Hopper kernels against the general ones.

    python benchmarks/varlen.py [--against-dense | --sequence-id | --packed | --general-reach | --hopper-reach |
                                 --clears]

Per shape (bf16; a batch of sequences of random lengths between a quarter and three quarters of S, the padded
batch of bench_attention.py's extras), real-token TFLOP/s of the forward and of forward+backward with the Hopper
kernels on and off, alternated over three rounds (the median), each timed eagerly and replayed from a CUDA graph.
The eager calls can be host-bound at these sizes (the packed forward's host path took 0.60 ms on the GPU machine
before its tile counts were kept per ``cu_seqlens``, 0.38 after; its kernel 0.3 ms at D128): the replay is the
kernels' ratio, the eager one what a loop of single calls sees.
``--against-dense``: equal sequences, packed against the same batch dense (``against_dense``).
``--sequence-id``: MPT's packed rows, as packed sequences against the masked dense kernels (``sequence_id_rows``).
``--packed``: the packed forward+backward alone, graph replays in ms, for A/Bs of the packed kernels
(``packed_fwd_bwd``).
``--general-reach``: the general kernels (Hopper kernels off) on packed sequences with causal ALiBi, key blocks past
its reach skipped against computed (``packed_reach``); ``--hopper-reach``: the same on the Hopper kernels.
``--clears``: the Hopper kernels on packed sequences with and without ``hopper.PACKED_CLEARS`` (rows past each
sequence's end cleared in shared memory, as ``seqused`` calls do), alternated (``packed_clears``).
"""

import sys

import torch
from triton.testing import do_bench

import mpt_attention as M
from mpt_attention.impl.triton import hopper
from mpt_attention.padding import unpad
from mpt_attention.testing import attention_flops, capture_cuda_graph

SHAPES = [(8, 16, 4096, 128, True), (8, 32, 4096, 64, True), (8, 16, 4096, 128, False)]  # B, H, S, D, causal
EQUAL_SHAPES = [(8, 16, 2048, 128), (8, 32, 2048, 64)]  # B sequences of S: packed against dense


def alternate(module, attr, values, fwd, leaves, dout, flops, rounds, graph):
    """``{(mode, "eager" or "graph", value): [TFLOP/s per round]}``: ``fwd`` (``flops``) and forward+backward
    (gradients of ``leaves`` for ``dout``, 3.5x the FLOPs) timed with ``module.attr`` set to each of ``values`` in
    turn (the first again at the end), alternated over ``rounds``; eagerly, and with ``graph`` also replayed from a
    CUDA graph (a path that cannot be captured is reported, not timed)."""
    def fwd_bwd():
        return torch.autograd.grad(fwd(), leaves, dout)

    results = {}
    for _ in range(rounds):
        for value in values:
            setattr(module, attr, value)
            for mode, fn, work in (("fwd", fwd, flops), ("fwd_bwd", fwd_bwd, 3.5 * flops)):
                timings = {"eager": do_bench(fn, warmup=25, rep=100, return_mode="median")}
                if graph:
                    try:
                        captured, _ = capture_cuda_graph(fn)
                        timings["graph"] = do_bench(captured.replay, warmup=25, rep=100, return_mode="median")
                        del captured
                    except RuntimeError as err:
                        print(f"no graph ({attr}={value} {mode}): {err}", flush=True)
                        timings["graph"] = float("nan")
                for timing, ms in timings.items():
                    results.setdefault((mode, timing, value), []).append(work / ms / 1e9)
    setattr(module, attr, values[0])
    return results


def _median(values):
    return sorted(values)[len(values) // 2]


def _print_ab(label, results, values, names):
    """``alternate``'s results as one line per mode and timing: the medians for ``values`` (named ``names``) and the
    first's ratio to the second."""
    for mode in ("fwd", "fwd_bwd"):
        for timing in ("eager", "graph"):
            first, second = (_median(results[mode, timing, x]) for x in values)
            print(f"{label:52s} {mode:7s} {timing} {names[0]} {first:6.1f}  {names[1]} {second:6.1f}  ratio "
                  f"{first / second:.3f} TFLOP/s (real tokens)", flush=True)


def padded_batch(batch, n_heads, seq, head_dim):
    """A batch of sequences of random lengths in [S/4, 3S/4) (bf16, fixed seed) packed: ``(q, k, v, cu_seqlens,
    longest, lengths)``, q/k/v (T, H, D) leaves."""
    gen = torch.Generator().manual_seed(2)
    lengths = torch.randint(seq // 4, 3 * seq // 4, (batch,), generator=gen)
    mask = (torch.arange(seq).view(1, seq) < lengths.view(batch, 1)).to("cuda")
    q, k, v = (torch.randn(batch, seq, n_heads, head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    (qp, kp, vp), (_, cu, max_len) = [unpad(t, mask)[0] for t in (q, k, v)], unpad(q, mask)[1:]
    qp, kp, vp = (t.contiguous().requires_grad_() for t in (qp, kp, vp))
    return qp, kp, vp, cu, max_len, lengths


def packed_case(batch, n_heads, seq, head_dim, causal):
    """``padded_batch``'s sequences with MPT's slopes: ``(fwd, leaves, dout, real-token FLOPs)``, ``fwd`` the packed
    forward (``attention_varlen``, triton) of the leaves q, k, v."""
    qp, kp, vp, cu, max_len, lengths = padded_batch(batch, n_heads, seq, head_dim)
    slopes = M.gen_slopes(n_heads, return_1d=True, device="cuda")
    real = sum(attention_flops(1, n_heads, int(n), int(n), head_dim, causal=causal) for n in lengths)

    def fwd():
        return M.attention_varlen(qp, kp, vp, cu, cu, max_len, max_len, backend="triton", causal=causal,
                                  alibi_slopes=slopes)

    return fwd, [qp, kp, vp], torch.randn_like(qp), real


def measure(batch, n_heads, seq, head_dim, causal, rounds=3):
    fwd, leaves, dout, real = packed_case(batch, n_heads, seq, head_dim, causal)
    results = alternate(hopper, "ENABLED", (True, False), fwd, leaves, dout, real, rounds, graph=True)
    label = f"B{batch} H{n_heads} S{seq} D{head_dim} {'causal' if causal else 'non-causal'} ALiBi, ~50% padding"
    _print_ab(label, results, (True, False), ("hopper", "general"))


def against_dense(batch, n_heads, seq, head_dim, causal=True):
    """The same batch of equal sequences packed and dense, Hopper kernels both (CUDA-graph replays, ms): what
    packing costs where it saves nothing (tile order, masked stores, per-tile lengths)."""
    dev = "cuda"
    slopes = M.gen_slopes(n_heads, return_1d=True, device=dev)
    qp, kp, vp = (torch.randn(batch * seq, n_heads, head_dim, device=dev, dtype=torch.bfloat16, requires_grad=True)
                  for _ in range(3))
    dout = torch.randn_like(qp)
    cu = torch.arange(0, batch * seq + 1, seq, device=dev, dtype=torch.int32)
    qd, kd, vd = (x.detach().view(batch, seq, n_heads, head_dim).requires_grad_() for x in (qp, kp, vp))
    runs = {"packed": (lambda: M.attention_varlen(qp, kp, vp, cu, cu, seq, seq, backend="triton", causal=causal,
                                                  alibi_slopes=slopes), [qp, kp, vp], dout),
            "dense": (lambda: M.attention(qd, kd, vd, backend="triton", causal=causal, alibi_slopes=slopes),
                      [qd, kd, vd], dout.view(batch, seq, n_heads, head_dim))}
    line = f"B{batch} H{n_heads} S{seq} D{head_dim} {'causal' if causal else 'non-causal'} ALiBi, equal lengths:"
    for name, (fwd, leaves, grad) in runs.items():
        for mode, fn in (("fwd", fwd), ("fwd_bwd", lambda fwd=fwd, leaves=leaves, grad=grad:
                                             torch.autograd.grad(fwd(), leaves, grad))):
            graph, _ = capture_cuda_graph(fn)
            line += f" {name}-{mode} {do_bench(graph.replay, warmup=25, rep=100, return_mode='median'):.3f} ms"
            del graph
    print(line, flush=True)


def sequence_id_rows(batch, n_heads, seq, head_dim, causal=True, rounds=3):
    """MPT's packed rows, ``attention(sequence_id=...)`` (sorted ids, runs of random lengths between S/8 and S/2):
    as packed sequences (``packed_rows``, the default on an H100/H200) against the masked dense kernels
    (``packed_rows.ROUTE = False``), eager (a CUDA graph capture takes the masked path), TFLOP/s of the real
    (within-run) work."""
    from mpt_attention import packed_rows

    dev = "cuda"
    gen = torch.Generator().manual_seed(3)
    rows, real = [], 0.0
    for _ in range(batch):
        cuts, at = [], 0
        while at < seq:
            n = min(int(torch.randint(seq // 8, seq // 2, (1,), generator=gen)), seq - at)
            cuts.append(n)
            at += n
        rows.append(torch.cat([torch.full((n,), i) for i, n in enumerate(cuts)]))
        real += sum(attention_flops(1, n_heads, n, n, head_dim, causal=causal) for n in cuts)
    ids = torch.stack(rows).to(dev)
    q, k, v = (torch.randn(batch, seq, n_heads, head_dim, device=dev, dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    slopes = M.gen_slopes(n_heads, return_1d=True, device=dev)
    dout = torch.randn_like(q)

    def fwd():
        return M.attention(q, k, v, backend="triton", causal=causal, alibi_slopes=slopes, sequence_id=ids)

    results = alternate(packed_rows, "ROUTE", (None, False), fwd, [q, k, v], dout, real, rounds, graph=False)
    label = f"B{batch} H{n_heads} S{seq} D{head_dim} {'causal' if causal else 'non-causal'} ALiBi, sequence_id runs"
    for mode in ("fwd", "fwd_bwd"):
        on, off = (_median(results[mode, "eager", r]) for r in (None, False))
        print(f"{label:52s} {mode:7s} packed {on:6.1f}  masked {off:6.1f}  ratio {on / off:.3f} TFLOP/s (real work)",
              flush=True)


def packed_fwd_bwd():
    """The packed forward+backward alone, CUDA-graph replays (ms), for ``ab.sh`` A/Bs of the packed kernels:
    equal sequences (``against_dense``'s batches) and the padded batches of ``SHAPES``, causal ALiBi."""
    def replay_ms(qp, kp, vp, cu, max_len, n_heads, causal):
        slopes = M.gen_slopes(n_heads, return_1d=True, device="cuda")
        dout = torch.randn_like(qp)
        graph, _ = capture_cuda_graph(lambda: torch.autograd.grad(
            M.attention_varlen(qp, kp, vp, cu, cu, max_len, max_len, backend="triton", causal=causal,
                               alibi_slopes=slopes), [qp, kp, vp], dout))
        return do_bench(graph.replay, warmup=25, rep=100, return_mode="median")

    for batch, n_heads, seq, head_dim in EQUAL_SHAPES:
        qp, kp, vp = (torch.randn(batch * seq, n_heads, head_dim, device="cuda", dtype=torch.bfloat16,
                                  requires_grad=True) for _ in range(3))
        cu = torch.arange(0, batch * seq + 1, seq, device="cuda", dtype=torch.int32)
        print(f"B{batch} H{n_heads} S{seq} D{head_dim} equal fwdbwd "
              f"{replay_ms(qp, kp, vp, cu, seq, n_heads, True):.4f} ms", flush=True)
    for batch, n_heads, seq, head_dim, causal in SHAPES:
        qp, kp, vp, cu, max_len, _ = padded_batch(batch, n_heads, seq, head_dim)
        name = "padded" if causal else "padded-noncausal"
        print(f"B{batch} H{n_heads} S{seq} D{head_dim} {name} "
              f"{replay_ms(qp, kp, vp, cu, max_len, n_heads, causal):.4f} ms", flush=True)


def packed_reach(batch, n_heads, seq, head_dim, hopper_kernels=False, rounds=3):
    """A padded batch packed, causal ALiBi: key blocks past ALiBi's reach skipped (``hopper.REACH_MIN_KEYS`` as
    shipped; one norm bound per head over all tokens, ``reach.norm_row``) against every block computed, real-token
    TFLOP/s, eager and replayed from a CUDA graph; the general kernels (the Hopper kernels off, as on GPUs without
    them), or with ``hopper_kernels`` the Hopper ones."""
    fwd, leaves, dout, real = packed_case(batch, n_heads, seq, head_dim, True)
    shipped, enabled = hopper.REACH_MIN_KEYS, hopper.ENABLED
    hopper.ENABLED = hopper_kernels and enabled
    try:
        results = alternate(hopper, "REACH_MIN_KEYS", (shipped, 1 << 62), fwd, leaves, dout, real, rounds, graph=True)
    finally:
        hopper.ENABLED = enabled
    label = f"B{batch} H{n_heads} S{seq} D{head_dim} causal ALiBi, ~50% padding, packed"
    kernels = "hopper" if hopper_kernels else "general"
    _print_ab(label, results, (shipped, 1 << 62), (f"{kernels}: reach", "every block"))


def packed_clears(batch, n_heads, seq, head_dim, causal, rounds=3):
    """The padded batch packed, on the Hopper kernels: the variant that clears each sequence's neighbour rows before
    its products read them (``hopper.PACKED_CLEARS``) against the one that masks them only, real-token TFLOP/s, eager
    and replayed from a CUDA graph."""
    fwd, leaves, dout, real = packed_case(batch, n_heads, seq, head_dim, causal)
    results = alternate(hopper, "PACKED_CLEARS", (False, True), fwd, leaves, dout, real, rounds, graph=True)
    label = f"B{batch} H{n_heads} S{seq} D{head_dim} {'causal' if causal else 'non-causal'} ALiBi, ~50% padding"
    _print_ab(label, results, (True, False), ("cleared", "masked"))


def main():
    if "--clears" in sys.argv:
        for shape in SHAPES:
            packed_clears(*shape)
        return
    if "--sequence-id" in sys.argv:
        for shape in ((4, 16, 8192, 128), (8, 32, 2048, 64)):
            sequence_id_rows(*shape)
        return
    if "--against-dense" in sys.argv:
        for shape in EQUAL_SHAPES:
            against_dense(*shape)
        return
    if "--packed" in sys.argv:
        packed_fwd_bwd()
        return
    for flag, hopper_kernels in (("--general-reach", False), ("--hopper-reach", True)):
        if flag in sys.argv:  # sequences of 2k-6k keys: most take the reach (hopper.REACH_MIN_KEYS)
            for shape in ((8, 16, 8192, 128), (8, 32, 8192, 64)):
                packed_reach(*shape, hopper_kernels=hopper_kernels)
            return
    for shape in SHAPES:
        measure(*shape)


if __name__ == "__main__":
    main()
