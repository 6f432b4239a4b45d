"""The GPU benchmark scripts stay importable and their FLOP accounting stays right (CPU smoke test)."""

import importlib.util
from pathlib import Path

import pytest

from mpt_attention.testing import attention_flops

ROOT = Path(__file__).resolve().parents[1]


def _load_script(name):
    """A script of benchmarks/ imported as a module (they are not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("script", ["bench_attention", "tune_blocks", "tune_dkdv", "fwd_variants", "summarize",
                                    "host_overhead", "bwd_kernels", "bias_row", "ab_summary", "head_dims",
                                    "fused_dq", "dense_bias", "sass_hotspots", "varlen", "launch_in_step",
                                    "window_probe", "step_timeline", "soak", "alibi_precision", "pair_clocks",
                                    "delta_probe", "graph_ab"])
def test_benchmark_scripts_import(script):
    pytest.importorskip("triton")
    if script == "tune_dkdv":  # runs its sweep at import: only check it compiles
        compile((ROOT / "benchmarks" / f"{script}.py").read_text(), script, "exec")
        return
    assert callable(_load_script(script).main)


def test_flop_counts():
    assert attention_flops(1, 1, 4, 4, 1, causal=False) == 4 * 16
    assert attention_flops(1, 1, 4, 4, 1, causal=True) == 4 * 10  # rows see 1, 2, 3, 4 keys
    assert attention_flops(1, 1, 2, 5, 1, causal=True) == 4 * 9  # bottom-right: 4 + 5
    assert attention_flops(1, 1, 5, 2, 1, causal=True) == 4 * 3  # first 3 rows see nothing
    assert attention_flops(2, 3, 8, 8, 16, causal=False, mode="fwd_bwd") == 3.5 * 4 * 2 * 3 * 64 * 16


def test_summarize_pivots_a_run_into_ratio_tables(tmp_path, capsys):
    import json

    module = _load_script("summarize")
    rows = [dict(suite="main", shape="B1 H1/1 S8 D16", mode="fwd", provider=p, ms=1.0, tflops=t, note="")
            for p, t in (("triton-alibi", 300.0), ("fa4-alibi", 400.0), ("triton", 310.0),
                         ("triton-alibi-all-blocks", 280.0))]
    rows.append(dict(suite="padding", shape="x", mode="fwd", provider="triton-varlen", ms=0.5, tflops=90.0, note="n"))
    path = tmp_path / "run.json"
    meta = {"gpu": "G", "torch": "t", "triton": "tr", "commit": "c", "date": "d"}

    def summarized() -> str:
        """What summarize.py prints for ``rows`` as they stand."""
        path.write_text(json.dumps({"meta": meta, "rows": rows}))
        module.main(str(path))
        return capsys.readouterr().out

    out = summarized()
    # ALiBi against no bias as run (skipping past the reach) and on every visible block; the skip's gain beside them
    assert "| B1 H1/1 S8 D16 | 300 | 400 | 310 | 280 | 0.75 | - | 0.70 | - | - | 0.97 | 0.90 | - | 1.07 | - |" in out
    assert "| padding | x | fwd | triton-varlen | 0.500 | 90.0 | n |" in out
    assert "spread" not in out  # single-measurement runs (before --rounds) have none to report
    for row, spread in zip(rows, (0.02, 0.05, 0.01, 0.01)):
        row["spread"] = spread
    assert "widest spread (max - min) / median: 5.0% (fa4-alibi, B1 H1/1 S8 D16)" in summarized()
    # the noncausal suite gets its own ratio table, not a row per measurement
    rows += [dict(suite="noncausal", shape="B1 H1/1 S8 D16", mode="fwd", provider=p, ms=1.0, tflops=t, note="")
             for p, t in (("triton-alibi", 450.0), ("flex-alibi", 300.0))]
    out = summarized()
    assert "### fwd, not causal (symmetric ALiBi)" in out
    assert "| B1 H1/1 S8 D16 | 450 | 300 | - | 1.50 | - | - | - | - | - | - | - |" in out
    assert "| noncausal |" not in out
    # ratios measured paired get columns of their own after the others, and no provider column
    rows.append(dict(suite="main", shape="B1 H1/1 S8 D16", mode="fwd", provider="triton-alibi / triton", ms=None,
                     tflops=None, spread=None, ratio=0.981, quartiles=[0.97, 0.99], note="paired"))
    out = summarized()
    assert "| vec bias / slopes | reach skip gain | deterministic / default | ALiBi / no bias, paired |" in out
    assert "vec bias / slopes, paired" not in out  # not measured in this run
    assert "| 1.07 | - | 0.981 |" in out
    assert "| triton-alibi / triton |" not in out
    # against a peer too (a host-bound cell's medians follow the host's slow windows; interleaved calls share them)
    rows.append(dict(suite="main", shape="B1 H1/1 S8 D16", mode="fwd", provider="triton-alibi / fa4-alibi", ms=None,
                     tflops=None, spread=None, ratio=1.012, quartiles=[0.99, 1.03], note="paired"))
    out = summarized()
    assert "| ALiBi / no bias, paired | ours+ALiBi / FA4+ALiBi, paired |" in out
    assert "| 1.07 | - | 0.981 | 1.012 |" in out


def test_sass_hotspots_reads_ncu_source_csv(tmp_path, capsys):
    """ncu's source page as benchmarks/ncu_sass.sh exports it: a kernel-name line, a header, one row per SASS
    instruction; regions start at USETMAXREG; numbers may carry thousands separators."""
    header = ["Address", "Source", "Warp Stall Sampling (All Samples)", "Instructions Executed",
              "L1 Wavefronts Shared", "L1 Wavefronts Shared Ideal", "stall_barrier", "stall_long_sb",
              "stall_barrier (Not Issued)"]
    rows = [["0x0", "LDC R1, c[0x0][0x28]", "2", "8", "0", "0", "2", "0", "2"],
            ["0x10", "USETMAXREG.TRY_ALLOC.CTAPOOL UP0, 0xd8", "0", "4", "0", "0", "0", "0", "0"],
            ["0x20", "HGMMA.64x32x16.F32.BF16 R24, gdesc[UR4], R24", "10", "1,000,000", "6,000,000", "6,000,000", "0",
             "10", "0"],
            ["0x30", "@!P0  BRA 0x20", "88", "1,000", "0", "0", "8", "80", "8"]]
    lines = ['"Kernel Name","k",'] + [",".join(f'"{c}"' for c in r) for r in [header] + rows]
    path = tmp_path / "k-sass.csv"
    path.write_text("\n".join(lines) + "\n")
    _load_script("sass_hotspots").report(str(path), top=2)
    out = capsys.readouterr().out
    assert "HGMMA.64x32x16.F32.BF16                 6.0M (ideal 6.0M) over 1.0M warp instructions" in out
    assert "long_sb 90%  barrier 10%" in out  # 90 of the 100 samples
    assert "[    1,     4)  98.0% of samples" in out
    assert "    3  88.0% long_sb        @!P0  BRA 0x20" in out


def test_ab_script_prepares_packages_and_alternates_them(tmp_path):
    """benchmarks/ab.sh: ``prepare`` archives a revision's package, ``run`` alternates package dirs."""
    import os
    import shutil
    import subprocess

    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs the git checkout")
    script = ROOT / "benchmarks" / "ab.sh"
    subprocess.run(["bash", str(script), "prepare", "HEAD"], cwd=ROOT, check=True, capture_output=True,
                   env={**os.environ, "AB_DIR": str(tmp_path)})
    assert (tmp_path / "HEAD" / "mpt_attention" / "__init__.py").exists()
    show = "python -c 'import mpt_attention, pathlib; print(pathlib.Path(mpt_attention.__file__).parts[-3])'"
    out = subprocess.run(["bash", str(script), "run", "2", show, str(tmp_path / "HEAD"), "src"], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout.split()
    head = str(tmp_path / "HEAD")
    assert out == ["==", head, "round", "1", "HEAD", "==", "src", "round", "1", "src",
                   "==", head, "round", "2", "HEAD", "==", "src", "round", "2", "src"]


def test_ab_script_reports_a_failed_run_and_goes_on(tmp_path):
    """One run that fails (a timeout, a crash) must not end the A/B: the other packages still run."""
    import subprocess

    for name in ("a", "b"):
        (tmp_path / name / "mpt_attention").mkdir(parents=True)
    cmd = 'case "$PYTHONPATH" in */a) exit 124;; *) echo ran;; esac'
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "ab.sh"), "run", "1", cmd, str(tmp_path / "a"),
                             str(tmp_path / "b")], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0
    a, b = tmp_path / "a", tmp_path / "b"
    assert result.stdout.splitlines() == [f"== {a} round 1", f"!! {a} round 1 exited with 124", f"== {b} round 1",
                                          "ran"]


def test_ab_summary_reads_speeds_from_an_alternated_log(tmp_path, capsys):
    module = _load_script("ab_summary")
    log = tmp_path / "ab.log"
    log.write_text("""== ab/main round 1
fwd B2 H16/16 S8192 D128  slopes 500  no-bias 520  | row / slopes: fp32 0.950
B2 H16 S8192 D128: backward general 3.800 ms, dispatched 3.400 ms; hopper dK/dV 2.000 ms (rel. diff: dk 1.9e-03)
== ab/new round 1
fwd B2 H16/16 S8192 D128  slopes 540  no-bias 500  | row / slopes: fp32 0.990
B2 H16 S8192 D128: backward general 3.800 ms, dispatched 3.200 ms; hopper dK/dV 2.500 ms (rel. diff: dk 1.9e-03)
== ab/main round 2
fwd B2 H16/16 S8192 D128  slopes 520  no-bias 520  | row / slopes: fp32 0.950
""")
    runs, in_ms = module.parse(log.read_text().splitlines())
    assert runs["ab/main"][("B2 H16/16 S8192 D128", "slopes")] == [500.0, 520.0]
    assert ("B2 H16/16 S8192 D128", "fp32") not in runs["ab/main"]  # ratios after "|" are not measurements
    assert ("B2 H16 S8192 D128", "dk") not in runs["ab/main"]
    rel, _ = module.speeds(runs, in_ms)
    assert rel["ab/new"][("B2 H16/16 S8192 D128", "slopes")] == pytest.approx(540 / 510)  # TFLOP/s: higher is faster
    assert rel["ab/new"][("B2 H16 S8192 D128", "dispatched")] == pytest.approx(3.4 / 3.2)  # ms: lower is faster
    module.main([str(log), "--metric", "dispatched", "--pick", "1.05"])
    assert capsys.readouterr().out == "ab/new\n"
    module.main([str(log), "--metric", "dK/dV", "--pick", "1.0"])
    assert capsys.readouterr().out == "ab/main\n"  # the new one is slower there


def test_main_suite_alternates_providers_over_rounds_and_reports_the_median():
    pytest.importorskip("triton")
    module = _load_script("bench_attention")
    assert module.alternation(["a", "b", "c"], 3) == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert module.alternation(["a"], 1) == ["a"]
    assert module.alternation([], 3) == []
    names = [f"p{i}" for i in range(11)]  # the main suite's providers: each once per round, never first twice
    order = module.alternation(names, 3)
    rounds = [order[i * 11:(i + 1) * 11] for i in range(3)]
    assert all(sorted(r) == sorted(names) for r in rounds)
    assert len({r[0] for r in rounds}) == 3
    assert all(len({r.index(n) for r in rounds}) == 3 for n in names)  # three places for every provider
    ms, spread = module.summarize_rounds([1.0, 1.2, 0.9])
    assert ms == 1.0 and spread == pytest.approx(0.3)


def test_paired_ratios_interleave_the_two_providers_and_take_the_median_per_pair():
    pytest.importorskip("triton")
    module = _load_script("bench_attention")
    assert module.interleaved(3) == [0, 1, 1, 0, 0, 1]
    # the card slows down over the calls: each pair sees it alike, the ratio stays B / A = 1.02
    ms_a = [1.0, 1.1, 1.2, 1.3, 1.4]
    ratio, low, high = module.pair_ratios(ms_a, [1.02 * t for t in ms_a])
    assert ratio == pytest.approx(1.02) and low == pytest.approx(1.02) and high == pytest.approx(1.02)
    ratio, low, high = module.pair_ratios([1.0] * 5, [0.9, 1.0, 1.1, 1.2, 1.3])
    assert (ratio, low, high) == pytest.approx((1.1, 1.0, 1.2))
    with pytest.raises(ValueError):
        module.pair_ratios([1.0, 1.0], [1.0])


def test_main_suite_refuses_zero_rounds():
    import subprocess
    import sys

    pytest.importorskip("triton")
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_attention.py"), "--rounds", "0"],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 2 and "--rounds must be at least 1, got 0" in result.stderr


@pytest.mark.parametrize("setting", [pytest.param("NOT_A_SETTING=0,1", id="unknown-name"),
                                     pytest.param("PDL", id="no-values"),
                                     pytest.param("PDL=on,off", id="not-integers"),
                                     pytest.param("PDL=1,1", id="repeated-value")])
def test_graph_ab_names_a_bad_setting(setting):
    import subprocess
    import sys

    pytest.importorskip("triton")
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "graph_ab.py"), "--set", setting],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 2 and f"got {setting!r}" in result.stderr
