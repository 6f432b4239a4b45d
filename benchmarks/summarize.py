"""Turn one ``bench_attention.py`` results.json into the markdown tables of ``results/README.md``.

    python benchmarks/summarize.py benchmarks/results/<run>.json

Per mode, a row per shape and a column per provider (TFLOP/s), then the ratios the issue's targets are
stated in (the main suite; the noncausal one, if run, gets the same table); every ratio compares providers
measured in the same run.
"""

from __future__ import annotations

import json
import sys

RATIOS = (  # (column title, numerator, denominator); "all blocks": ours without skipping blocks past ALiBi's reach
    ("ours+ALiBi / FA4+ALiBi", "triton-alibi", "fa4-alibi"),
    ("/ Flex+ALiBi", "triton-alibi", "flex-alibi"),
    ("all blocks / FA4+ALiBi", "triton-alibi-all-blocks", "fa4-alibi"),
    ("all blocks / Flex+ALiBi", "triton-alibi-all-blocks", "flex-alibi"),
    ("ours / cuDNN", "triton", "cudnn"),
    ("ALiBi / no bias", "triton-alibi", "triton"),
    ("ALiBi all blocks / no bias", "triton-alibi-all-blocks", "triton"),
    ("vec bias / slopes", "triton-vecbias", "triton-alibi"),  # (both skip past the reach since 6f6f8ff)
    ("reach skip gain", "triton-alibi", "triton-alibi-all-blocks"),
    ("deterministic / default", "triton-alibi-deterministic", "triton-alibi"),
)
# measured paired (bench_attention.paired_ratio: calls interleaved), a row of their own in the results
PAIRED = (("ALiBi / no bias, paired", "triton-alibi / triton"),
          ("vec bias / slopes, paired", "triton-vecbias / triton-alibi"),
          ("ours+ALiBi / FA4+ALiBi, paired", "triton-alibi / fa4-alibi"),
          ("ours / cuDNN, paired", "triton / cudnn"))


def pivot(rows, mode, suite="main"):
    main = [r for r in rows if r["suite"] == suite and r["mode"] == mode]
    shapes = list(dict.fromkeys(r["shape"] for r in main))
    providers = list(dict.fromkeys(r["provider"] for r in main if "ratio" not in r))
    value = {(r["shape"], r["provider"]): r["tflops"] for r in main}
    paired = {(r["shape"], r["provider"]): r["ratio"] for r in main if "ratio" in r}
    titles = [title for title, pair in PAIRED if any(key[1] == pair for key in paired)]
    head = ["shape (B, H_q/H_kv, S, D)", *providers, *(title for title, _, _ in RATIOS), *titles]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for shape in shapes:
        cells = [shape] + [f"{value[shape, p]:.0f}" if value.get((shape, p)) else "-" for p in providers]
        for _, num, den in RATIOS:
            a, b = value.get((shape, num)), value.get((shape, den))
            cells.append(f"{a / b:.2f}" if a and b else "-")
        for title, pair in PAIRED:
            if title in titles:
                cells.append(f"{paired[shape, pair]:.3f}" if (shape, pair) in paired else "-")
        lines.append("| " + " | ".join(cells) + " |")
    spreads = [(r["spread"], r["shape"], r["provider"]) for r in main if r.get("spread") is not None]
    if spreads:  # runs with several alternated rounds per cell (bench_attention.py --rounds)
        worst = max(spreads)
        note = f"Cells are medians of alternated rounds; widest spread (max - min) / median: {worst[0]:.1%}"
        lines += ["", f"{note} ({worst[2]}, {worst[1]})."]
    if titles:
        lines += ["", "Paired columns: the median of per-pair ratios from interleaved calls "
                  "(bench_attention.paired_ratio)."]
    return lines


PIVOTED = ("main", "noncausal")  # suites shown as a table per mode (the others: a row per measurement)


def extras(rows):
    lines = ["| suite | shape | mode | provider | ms | TFLOP/s | note |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["suite"] not in PIVOTED:
            lines.append(f"| {r['suite']} | {r['shape']} | {r['mode']} | {r['provider']} | {r['ms']:.3f} "
                         f"| {r['tflops']:.1f} | {r['note']} |")
    return lines


def main(path):
    with open(path) as f:
        data = json.load(f)
    meta, rows = data["meta"], data["rows"]
    out = [f"## {meta['gpu']}, torch {meta['torch']}, Triton {meta['triton']}, commit {meta['commit']}, {meta['date']}",
           "", "bf16; the main suite causal. TFLOP/s (4·B·H·S_q·S_k_visible·D per forward, x3.5 for fwd+bwd).", ""]
    for mode in dict.fromkeys(r["mode"] for r in rows if r["suite"] == "main"):
        out += [f"### {mode}", "", *pivot(rows, mode), ""]
    for mode in dict.fromkeys(r["mode"] for r in rows if r["suite"] == "noncausal"):
        out += [f"### {mode}, not causal (symmetric ALiBi)", "", *pivot(rows, mode, "noncausal"), ""]
    if any(r["suite"] not in PIVOTED for r in rows):
        out += ["### extras", "", *extras(rows), ""]
    print("\n".join(out))


if __name__ == "__main__":
    main(sys.argv[1])
