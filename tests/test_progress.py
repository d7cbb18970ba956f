"""Progress on long folders: ``medhybrid infer`` over 50 real images shows a bar with count, rate and time left on a
terminal (a pseudo-terminal here), and log lines with the same figures when its output is not a terminal."""

from __future__ import annotations

import os
import pty
import re
import select
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import PH2

from medhybrid.core.progress import Progress

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "dermoscopy_lesion_segmentation"


def _fifty(tmp_path: Path) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    for f in sorted((PH2 / "images").glob("*.png"))[:50]:
        shutil.copy(f, folder)
    return folder


def _cmd(folder: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "medhybrid.cli", "infer", "--model", str(BUNDLE), "--input", str(folder), "--output",
            str(out), "--no-quality"]


def test_log_lines_say_count_rate_and_time_left(caplog):
    import logging

    caplog.set_level(logging.INFO, logger="medhybrid")
    p = Progress(50, "inference", every=20)
    for _ in range(50):
        p.update()
    lines = [r.getMessage() for r in caplog.records]
    assert [ln.split(",")[0] for ln in lines] == ["inference: 20/50 images", "inference: 40/50 images", "inference: 50/50 images"]
    assert re.search(r"images/s, \d+:\d\d left$", lines[0]) and lines[-1].endswith("in all")


@pytest.mark.slow(seconds=40)
def test_infer_over_50_images_reports_progress_in_a_log_and_on_a_terminal(tmp_path, caplog):
    """Not a terminal (this process, its output captured): log records. A pseudo-terminal (a child process that owns
    it): a bar."""
    import logging

    from medhybrid.cli import main

    folder = _fifty(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    caplog.set_level(logging.INFO, logger="medhybrid")
    assert main(_cmd(folder, tmp_path / "log-out")[3:]) == 0
    lines = [r.getMessage() for r in caplog.records if "inference: " in r.getMessage() and "/50 images" in r.getMessage()]
    counts = [int(re.search(r"inference: (\d+)/50 images", ln).group(1)) for ln in lines]
    assert counts[-1] == 50 and len(counts) >= 3 and counts == sorted(counts)
    assert all(re.search(r"[\d.]+ images/s, (\d+:\d\d left|\d+:\d\d in all)", ln) for ln in lines)
    assert len(list((tmp_path / "log-out").glob("*_mask.png"))) == 50

    main, child = pty.openpty()  # a terminal: the same run draws a bar (tqdm) instead of log lines
    proc = subprocess.Popen(_cmd(folder, tmp_path / "tty-out"), stdin=child, stdout=child, stderr=child, env=env, close_fds=True)
    os.close(child)
    seen = b""
    while True:
        r, _, _ = select.select([main], [], [], 600)
        if not r:
            break
        try:
            chunk = os.read(main, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        seen += chunk
    assert proc.wait(timeout=60) == 0
    text = seen.decode(errors="replace")
    assert re.search(r"inference: +100%\|.*\| *50/50 \[", text), text[-1500:]  # count, then elapsed<left, rate
    assert re.search(r"50/50 \[\d+:\d\d<00:00, +[\d.]+(image/s|s/image)\]", text), text[-1500:]
    assert not re.search(r"inference: \d+/50 images", text)  # no log lines for the count on a terminal
