"""The install check, run as a newcomer would."""

import json
import re
import subprocess
import sys

import pytest

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


@pytest.mark.parametrize("version, reason", [
    pytest.param("3.5.1", "Triton 3.5.1 is older than the 3.6", id="3.5-too-old"),
    pytest.param("2.3.1", "Triton 2.3.1 is older than the 3.6", id="2.x-too-old"),
    pytest.param("3.6.0", None, id="3.6"),
    pytest.param("3.10.0+git1a2b3c", None, id="3.10-local-build"),
])
def test_the_triton_backend_names_a_triton_too_old_for_its_kernels(version, reason):
    from mpt_attention.api import triton_too_old

    found = triton_too_old(version)
    assert found == reason if reason is None else found.startswith(reason), found
