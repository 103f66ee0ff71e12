"""The command line: help that teaches, the demo end to end, the engine benchmark."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from igtcache.cli import main


def test_help_lists_every_subcommand(capsys):
    from igtcache.cli import COMMANDS

    assert main([]) == 2
    out = capsys.readouterr().out
    for command in COMMANDS:
        assert f"  {command} " in out


def test_unknown_command_is_a_usage_error(capsys):
    assert main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err


def test_bad_size_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["demo", "--disk", "12XB"])
    assert exit_.value.code == 2
    assert "not a size: '12XB'" in capsys.readouterr().err


def test_demo_runs_end_to_end_against_a_local_s3_server():
    out = subprocess.run(
        [sys.executable, "-m", "igtcache.cli", "demo", "--files", "6", "--file-size", "64KiB",
         "--block-size", "64KiB", "--read-size", "64KiB", "--disk", "256KiB", "--memory", "64KiB", "--epochs", "2"],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert any(line.startswith("epoch 1/2") and "hit ratio  0.00" in line for line in lines)
    assert any(line.startswith("after restart") for line in lines)


def test_engine_benchmark_reports_every_path(capsys):
    assert main(["bench", "engine", "--size", "8MiB", "--read-size", "1MiB", "--rounds", "1", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["results"]
    paths = {(r["path"], r["reads"]) for r in rows}
    assert len(paths) == 6
    assert all(r["bytes_per_s"] > 0 and r["ratio"] > 0 for r in rows)
