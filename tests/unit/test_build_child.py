"""The chat model build runs in a child process: what a starting node sees of it."""

from __future__ import annotations

from pathlib import Path

import pytest

from nodes.models.backends.onnx_build import BuildError, build_in_child

pytestmark = pytest.mark.timeout(120)


def test_a_build_child_writing_far_more_than_a_pipe_holds_to_stderr_does_not_hang_the_start(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Libraries write warnings and progress bars to stderr: a child that writes more than a pipe holds (64 KiB)
    before its answer on stdout must still be heard to the end, and its own reason for failing reported."""
    monkeypatch.setenv("PYTHONVERBOSE", "2")  # the child's python reports every import it tries: ~200 KiB on stderr
    source = tmp_path / "notes.txt"
    source.write_text("not a model")
    with pytest.raises(BuildError, match="expected an HF model folder .config.json. or a .gguf file"):
        build_in_child("notes", source, "int4", "cpu", tmp_path / "cache", lambda _stage, _fraction: None)
