"""The start's progress as a user sees it: at a terminal one line redrawn in place, fitted to the width, with log
lines above it; piped, plain log lines per stage; and what libraries print on their own kept out of it."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nodes.cli.progress import ProgressLine, StageLog
from tests.terminal import screen

ROOT = Path(__file__).resolve().parents[2]
BUILD = "smollm2: building the int4 ONNX model (first start only)"  # 57 characters


def test_the_line_shows_the_whole_stage_once_within_the_terminal_width() -> None:
    out = io.StringIO()
    show = ProgressLine(out, columns=lambda: 80)
    show(BUILD, 0.3)
    shown = screen(out.getvalue())[-1]
    assert shown == " 30% [###.........] " + BUILD  # not cut at 48 characters
    assert len(shown) <= 79 and shown.count("smollm2") == 1
    show("smollm2: building ONNX int4 model: layer 12/30 and a stage text far too long for this terminal", 0.5)
    shown = screen(out.getvalue())[-1]
    assert len(shown) == 79 and shown.endswith("...") and shown.startswith(" 50% [######......] smollm2: building")


def test_a_log_line_prints_above_the_progress_line_which_is_drawn_again() -> None:
    out = io.StringIO()
    show = ProgressLine(out, columns=lambda: 100)
    show(BUILD, 0.1)
    show.write("ts=... level=warning msg=something\n")
    show(BUILD, 0.2)
    lines = screen(out.getvalue())
    assert lines == ["ts=... level=warning msg=something", " 20% [####................] " + BUILD]


def test_the_line_is_gone_once_the_model_is_ready_and_writes_pass_through_after() -> None:
    out = io.StringIO()
    show = ProgressLine(out, columns=lambda: 80)
    show(BUILD, 0.9)
    show("smollm2: ready", 1.0)
    assert screen(out.getvalue()) == [""]
    show.write("model smollm2 ready in 97.0s\n")
    show.close()
    assert screen(out.getvalue()) == ["model smollm2 ready in 97.0s", ""]


def test_piped_progress_is_a_log_line_per_stage_not_per_layer(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    stages = StageLog(clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="lanmesh.node"):
        stages(BUILD, 0.0)
        for layer in range(30):
            now[0] += 1.0
            stages(f"smollm2: building ONNX int4 model: layer {layer}/30", 0.3 + layer / 60)
        stages("smollm2: ready", 1.0)
    said = [r.getMessage() for r in caplog.records]
    assert said == [
        f"{BUILD} (0%)",
        "smollm2: building ONNX int4 model: layer 0/30 (30%)",
        "smollm2: building ONNX int4 model: layer 15/30 (55%)",  # 15 s on, the same stage again
    ]


_LIBRARY_NOISE = """
import logging, sys, warnings
from nodes.runtime import logs
logs.setup("n1", sys.argv[1])
warnings.warn("a library's deprecation", FutureWarning)
logging.getLogger("zeroconf").warning("a library's warning")
logging.getLogger("somelib").error("a library's error")
logging.getLogger("nodes.models.loader").warning("model x: transformers engine")
logging.getLogger("mesh._calls").info("a mesh module's info")
import os
print(os.environ.get("TORCH_LOGS"), os.environ.get("TQDM_DISABLE"), os.environ.get("TRANSFORMERS_VERBOSITY"))
"""


def _log_lines(level: str) -> tuple[list[str], str]:
    env = {k: v for k, v in os.environ.items() if k not in ("TORCH_LOGS", "TQDM_DISABLE", "TRANSFORMERS_VERBOSITY")}
    done = subprocess.run([sys.executable, "-c", _LIBRARY_NOISE, level], capture_output=True, text=True, timeout=30,
                          env={**env, "PYTHONPATH": str(ROOT)}, check=True)  # fmt: skip
    return done.stderr.splitlines(), done.stdout.strip()


def test_libraries_say_only_their_errors_in_the_nodes_format_and_everything_at_debug() -> None:
    lines, env = _log_lines("info")
    assert len(lines) == 3, lines
    assert all(line.startswith("ts=") and " node=n1 " in line for line in lines), lines
    assert any("logger=somelib" in line and "level=error" in line for line in lines)
    assert any("logger=nodes.models.loader" in line for line in lines)  # the node's own modules, in the format
    assert any("logger=mesh._calls" in line for line in lines)
    assert env == "-all 1 error"  # torch's and transformers' own handlers at errors, no progress bars
    lines, env = _log_lines("debug")
    assert any("logger=py.warnings" in line and "deprecation" in line for line in lines), lines
    assert any("logger=zeroconf" in line for line in lines)
    assert env == "None 1 None"  # at debug the libraries speak as they would
