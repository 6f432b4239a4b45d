"""Where a kernel's time goes, per SASS instruction, from the CSV of ``benchmarks/ncu_sass.sh``:

    python benchmarks/sass_hotspots.py OUT/NAME-sass.csv [--top 25]

Prints shared-memory wavefronts by opcode (``wgmma`` operand reads count there too: that is where the fused
backward's "other" load/store-pipe traffic was, benchmarks/NOTES.md session 21), warp-stall samples by reason,
the same per code region (a warp-specialized kernel's partitions begin where ``USETMAXREG`` changes their
registers), and the instructions with the most stall samples. Samples are per warp: idle warps parked at
a barrier (a partition of fewer warps than its warpgroup) show up as ``barrier`` on a ``NOP``.
"""

import argparse
import collections
import csv

SAMPLES = "Warp Stall Sampling (All Samples)"


def _number(text: str) -> float:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return 0.0


def load(path: str) -> tuple[list[str], list[dict]]:
    """The stall-reason columns and one dict per SASS instruction (the file's first line names the kernel)."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    header = rows[1]
    reasons = [h for h in header if h.startswith("stall_") and "Not Issued" not in h]
    insts = []
    for row in rows[2:]:
        cell = dict(zip(header, row))
        source = cell["Source"].strip()
        words = source.split()
        opcode = (words[1] if words and words[0].startswith("@") and len(words) > 1 else words[0]) if words else "?"
        inst = {"source": source, "opcode": opcode, "samples": _number(cell.get(SAMPLES, "0")),
                "executed": _number(cell.get("Instructions Executed", "0")),
                "wavefronts": _number(cell.get("L1 Wavefronts Shared", "0")),
                "ideal": _number(cell.get("L1 Wavefronts Shared Ideal", "0"))}
        inst.update({r: _number(cell.get(r, "0")) for r in reasons})
        insts.append(inst)
    return reasons, insts


def _reasons_line(insts: list[dict], reasons: list[str], n: int = 6) -> str:
    total = collections.Counter({r: sum(i[r] for i in insts) for r in reasons})
    all_samples = sum(total.values()) or 1.0
    return "  ".join(f"{r[6:]} {100 * v / all_samples:.0f}%" for r, v in total.most_common(n) if v)


def report(path: str, top: int) -> None:
    reasons, insts = load(path)
    samples = sum(i["samples"] for i in insts) or 1.0

    print(f"shared-memory wavefronts: {sum(i['wavefronts'] for i in insts) / 1e6:.1f}M")
    by_op = collections.defaultdict(lambda: [0.0, 0.0, 0.0])
    for i in insts:
        entry = by_op[i["opcode"]]
        entry[0] += i["wavefronts"]
        entry[1] += i["ideal"]
        entry[2] += i["executed"]
    for op, (wf, ideal, executed) in sorted(by_op.items(), key=lambda kv: -kv[1][0]):
        if wf:
            print(f"  {op:34s} {wf / 1e6:8.1f}M (ideal {ideal / 1e6:.1f}M) over {executed / 1e6:.1f}M "
                  "warp instructions")

    print(f"\nstall samples: {samples:.0f}; {_reasons_line(insts, reasons, 8)}")
    starts = [0] + [n for n, i in enumerate(insts) if "USETMAXREG" in i["source"]] + [len(insts)]
    print("by region (a new one at each USETMAXREG; regions under 0.5% of the samples left out):")
    for lo, hi in zip(starts, starts[1:]):
        part = insts[lo:hi]
        share = sum(i["samples"] for i in part) / samples
        if share >= 0.005:
            executed = sum(i["executed"] for i in part)
            print(f"  [{lo:5d}, {hi:5d}) {100 * share:5.1f}% of samples, {executed / 1e6:7.1f}M warp instructions: "
                  f"{_reasons_line(part, reasons)}")

    print(f"\ntop {top} instructions by stall samples:")
    for n in sorted(range(len(insts)), key=lambda n: -insts[n]["samples"])[:top]:
        i = insts[n]
        main = max(reasons, key=lambda r: i[r])[6:] if i["samples"] else ""
        print(f"  {n:5d} {100 * i['samples'] / samples:5.1f}% {main:14s} {i['source'][:90]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("csv")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    report(args.csv, args.top)


if __name__ == "__main__":
    main()
