"""The chat model build: it runs in a child process (what a starting node sees of it), and its cache key names
everything that decides what was built."""

from __future__ import annotations

from pathlib import Path

import pytest

from nodes.models.backends import onnx_build
from nodes.models.backends.onnx_build import BuildError, build_in_child, built_entry

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


def test_a_build_made_by_another_version_of_its_recipe_is_built_again(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Changing how int4 is made (a recipe's version) must not serve builds made the old way from the cache."""
    gguf, folder = tmp_path / "model.gguf", tmp_path / "hf"
    gguf.write_bytes(b"GGUF not really")
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    before = {str(s): built_entry("m", s, "int4", "cpu", tmp_path) for s in (gguf, folder)}
    assert built_entry("m", gguf, "fp32", "cpu", tmp_path) != before[str(gguf)]
    monkeypatch.setitem(onnx_build.RECIPES, "gguf-blocks", "v-next")
    assert built_entry("m", gguf, "int4", "cpu", tmp_path) != before[str(gguf)]
    assert built_entry("m", folder, "int4", "cpu", tmp_path) == before[str(folder)]  # another recipe: untouched
    monkeypatch.setitem(onnx_build.RECIPES, "mixed", "v-next")
    assert built_entry("m", folder, "int4", "cpu", tmp_path) != before[str(folder)]
