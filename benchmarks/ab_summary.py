"""Reads the log of an alternated A/B (`benchmarks/ab.sh run ...`) and prints, per package directory, each
measurement's mean over the rounds and its speed against the first directory:

    python benchmarks/ab_summary.py LOG [--metric slopes --metric no-bias] [--pick 1.01]

A measurement is a "name value" pair on a line of the benchmark's output, keyed by the line's shape
(`bias_row.py`: "slopes 455", TFLOP/s, higher is faster; `bwd_kernels.py`: "dispatched 3.467 ms", lower is
faster). ``--metric`` keeps only those names. ``--pick RATIO``: print only the directory whose geometric-mean
speed over the first is highest and at least RATIO, else the first, so that a GPU run can go on with the
winner (the choice and the table go to stderr).
"""

import argparse
import math
import re
import sys
from collections import defaultdict

_HEADER = re.compile(r"^== (\S+) round \d+")
_SHAPE = re.compile(r"B\d+ H[\d/]+ S\d+ D\d+")
_PAIR = re.compile(r"([A-Za-z][\w/-]*) (\d+(?:\.\d+)?)( ms)?(?=[\s,;|]|$)")


def parse(lines):
    """{dir: {(shape, name): [values]}} and {(shape, name): True if milliseconds}."""
    runs, in_ms, current = defaultdict(lambda: defaultdict(list)), {}, None
    for line in lines:
        header = _HEADER.match(line)
        if header:
            current = header.group(1)
            continue
        shape = _SHAPE.search(line)
        if current is None or shape is None:
            continue
        rest = line[shape.end():].split("|")[0]  # bias_row's ratios after "|" are derived, not measured
        for name, value, ms in _PAIR.findall(rest):
            runs[current][(shape.group(0), name)].append(float(value))
            in_ms[(shape.group(0), name)] = bool(ms)
    return runs, in_ms


def speeds(runs, in_ms, metrics=None):
    """({dir: {key: speed against the first dir}}, {dir: {key: mean}}) over the keys the first dir has;
    a dir's speeds cover the keys it measured too (one log may hold several A/B runs)."""
    mean = {d: {k: sum(v) / len(v) for k, v in m.items() if not metrics or k[1] in metrics} for d, m in runs.items()}
    base = mean[next(iter(mean))]
    rel = {d: {k: (base[k] / v if in_ms[k] else v / base[k]) for k, v in m.items() if k in base}
           for d, m in mean.items()}
    return rel, mean


def geomean(values):
    values = list(values)
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("log")
    parser.add_argument("--metric", action="append", help="keep only these measurement names")
    parser.add_argument("--pick", type=float, help="print the winning directory (speed at least this ratio)")
    args = parser.parse_args(argv)
    with open(args.log) as f:
        runs, in_ms = parse(f)
    if not runs:
        raise SystemExit(f"{args.log}: no '== DIR round N' sections with measurements")
    rel, mean = speeds(runs, in_ms, args.metric)
    dirs = list(rel)
    table = sys.stderr if args.pick is not None else sys.stdout
    print("| shape | measurement | " + " | ".join(dirs) + " |", file=table)
    print("|---|---|" + "---|" * len(dirs), file=table)
    for key in mean[dirs[0]]:
        unit = " ms" if in_ms[key] else ""
        cells = ["-" if key not in rel[d] else f"{mean[d][key]:.4g}{unit}" + ("" if d == dirs[0] else
                 f" ({rel[d][key]:.3f}x)") for d in dirs]
        print(f"| {key[0]} | {key[1]} | " + " | ".join(cells) + " |", file=table)
    overall = {d: geomean(rel[d].values()) for d in dirs}
    print("geometric-mean speed against " + dirs[0] + ": " + ", ".join(f"{d} {overall[d]:.3f}x" for d in dirs),
          file=table)
    if args.pick is not None:
        best = max(dirs, key=overall.get)
        winner = best if overall[best] >= args.pick else dirs[0]
        print(f"picked {winner}", file=sys.stderr)
        print(winner)


if __name__ == "__main__":
    main()
