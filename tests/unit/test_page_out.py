"""`page_out_file`: the pages of a file this process read through a mapping stop counting as its memory, and the
mapping still reads the same bytes (a stage drops the weight pages onnxruntime read once to prepack)."""

from __future__ import annotations

import mmap
from pathlib import Path

import pytest

from nodes.models.backends.base import page_out_file


def _resident_kib(path: Path) -> int:
    total, inside = 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split()
            if "-" in head[0] and len(head) >= 5 and ":" in head[3]:  # a mapping's first line
                inside = line.rstrip("\n").endswith(str(path.resolve()))
            elif inside and head[0] == "Rss:":
                total += int(head[1])
    return total


@pytest.mark.parametrize("name", ["the file", "its folder"])
def test_the_read_pages_of_a_mapped_file_are_given_back_and_read_the_same_again(tmp_path: Path, name: str) -> None:
    if not Path("/proc/self/smaps").exists():
        pytest.skip("needs Linux's /proc")
    path = tmp_path / "weights.bin"
    data = bytes(range(256)) * (4 << 12)  # 4 MiB
    path.write_bytes(data)
    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        assert mapped[:] == data  # every page read: resident
        assert _resident_kib(path) >= 4000
        if page_out_file(path if name == "the file" else tmp_path) == 0:
            pytest.skip("this kernel cannot page out (MADV_PAGEOUT needs Linux 5.4)")
        assert _resident_kib(path) < 256
        assert mapped[:] == data
    finally:
        mapped.close()
