"""benchmarks/: each script runs at small sizes on the CPU and prints medhybrid's figures beside a plain
PyTorch loop's, with their ratio (the figures themselves are recorded in benchmarks/README.md)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from conftest import REPO_ROOT

BENCH = REPO_ROOT / "benchmarks"


def _run(script: str, *args: str) -> str:
    out = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True, timeout=600, cwd=REPO_ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def _ratio(text: str, name: str) -> float:
    m = re.search(rf"{name} ([0-9.]+)", text)
    assert m, text
    return float(m.group(1))


@pytest.mark.parametrize("mode", ["hybrid", "finetune"])
def test_training_throughput_side_by_side(data, mode):
    out = _run("pretrain_throughput.py", "--iters", "2", "--batch", "2", "--res", "32", "--mode", mode)
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.startswith(("plain ", "engine "))}
    assert set(rows) == {"plain", "engine"} and all(float(v[0]) > 0 and float(v[1]) > 0 for v in rows.values())
    assert _ratio(out, "throughput") > 0 and _ratio(out, "peak memory") > 0


def test_inference_latency_side_by_side(data):
    out = _run("inference_latency.py", "--images", "3", "--res", "32", "--batch", "2")
    assert "3 PH2 test images" in out
    ms = {line.split()[0]: float(line.split()[1]) for line in out.splitlines() if line.startswith(("plain ", "medhybrid "))}
    assert set(ms) == {"plain", "medhybrid"} and all(v > 0 for v in ms.values())
    assert _ratio(out, "latency") == pytest.approx(ms["medhybrid"] / ms["plain"], rel=0.01)
