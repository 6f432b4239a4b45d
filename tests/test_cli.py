"""The install check, run as a newcomer would."""

import json
import re
import subprocess
import sys

from mpt_attention import cli


def test_check_json_report(capsys):
    assert cli.main(["check", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["device"] == "cpu"
    assert set(report["backends"]) == {"torch", "sdpa", "flash", "triton"}
    for backend in ("torch", "sdpa", "triton"):
        assert all(report["backends"][backend][key]["ok"] for key in ("check", "dense_check", "varlen_check"))
    assert not report["backends"]["flash"]["available"] and report["backends"]["flash"]["reason"]
    assert {row["backend"] for row in report["timing"]} == {"torch", "sdpa", "triton"}


def test_console_script_entry_point():
    result = subprocess.run([sys.executable, "-m", "mpt_attention.cli", "check"], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr
    assert "result: OK" in result.stdout
    for check in ("padded", "dense", "varlen"):
        assert re.search(rf"triton +{check} +PASS", result.stdout), check
    assert "[general (" in result.stdout  # which forward kernel served the dense check, and why
