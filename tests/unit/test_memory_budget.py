"""The memory a node may fill: its cgroup's limit (v2 and v1 layouts, a slice above it) and --max-memory; models
that would not fit are refused naming the model, what it needs, the limit and where that comes from."""

from __future__ import annotations

from pathlib import Path

import pytest

from nodes.runtime.memory_budget import (
    CGROUP_ROOT_ENV,
    MemoryLimit,
    ModelTooBig,
    cgroup_memory_limits,
    check_models_fit,
    node_memory_limits,
)

MiB, GiB = 2**20, 2**30


def _cgroup(folder: Path, files: dict[str, str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text + "\n")
    return folder


def test_a_v2_service_limit_is_read_with_what_the_cgroup_holds_beyond_droppable_cache(tmp_path: Path) -> None:
    service = _cgroup(
        tmp_path / "system.slice" / "lanmesh.service",
        {"memory.max": str(GiB), "memory.current": str(300 * MiB), "memory.stat": f"anon 1\ninactive_file {100 * MiB}"},
    )
    _cgroup(tmp_path / "system.slice", {"memory.max": "max", "memory.current": str(5 * GiB)})
    limits = cgroup_memory_limits("0::/system.slice/lanmesh.service\n", tmp_path, env={})
    assert limits == [MemoryLimit(GiB, 200 * MiB, "cgroup", service / "memory.max")]
    assert limits[0].free == 824 * MiB


def test_a_slice_limit_binds_the_services_under_it(tmp_path: Path) -> None:
    _cgroup(tmp_path / "lanmesh.slice" / "lanmesh.service", {"memory.max": "max", "memory.current": str(50 * MiB)})
    _cgroup(tmp_path / "lanmesh.slice", {"memory.max": str(512 * MiB), "memory.current": str(400 * MiB)})
    limits = cgroup_memory_limits("0::/lanmesh.slice/lanmesh.service\n", tmp_path, env={})
    assert [(lim.limit, lim.used, lim.file) for lim in limits] == [
        (512 * MiB, 400 * MiB, tmp_path / "lanmesh.slice" / "memory.max")
    ]


def test_no_limit_anywhere_is_no_limit(tmp_path: Path) -> None:
    _cgroup(tmp_path / "user.slice", {"memory.max": "max"})
    assert cgroup_memory_limits("0::/user.slice\n", tmp_path, env={}) == []
    assert cgroup_memory_limits("", tmp_path, env={}) == []


def test_a_v1_memory_hierarchy_wins_in_hybrid_mode_and_a_container_sees_its_own_cgroup_at_the_mount_root(
    tmp_path: Path,
) -> None:
    # A container without a cgroup namespace: /proc/self/cgroup names the host's path, which its mount lacks.
    _cgroup(
        tmp_path / "memory",
        {
            "memory.limit_in_bytes": str(2 * GiB),
            "memory.usage_in_bytes": str(GiB),
            "memory.stat": f"cache 9\ntotal_inactive_file {256 * MiB}",
        },
    )
    proc = "12:pids:/docker/abc\n4:memory:/docker/abc\n0::/docker/abc\n"
    limits = cgroup_memory_limits(proc, tmp_path, env={})
    assert [(lim.limit, lim.used) for lim in limits] == [(2 * GiB, 768 * MiB)]


def test_v1s_unlimited_number_is_no_limit(tmp_path: Path) -> None:
    _cgroup(tmp_path / "memory" / "a", {"memory.limit_in_bytes": "9223372036854771712"})
    assert cgroup_memory_limits("4:memory:/a\n", tmp_path, env={}) == []


def test_the_cgroup_folder_can_be_named_outright(tmp_path: Path) -> None:
    folder = _cgroup(tmp_path / "c", {"memory.max": str(256 * MiB), "memory.current": str(64 * MiB)})
    limits = cgroup_memory_limits(env={CGROUP_ROOT_ENV: str(folder)})
    assert [(lim.limit, lim.used) for lim in limits] == [(256 * MiB, 64 * MiB)]


def test_max_memory_counts_what_the_process_already_holds(tmp_path: Path) -> None:
    limits = node_memory_limits(GiB, env={CGROUP_ROOT_ENV: str(tmp_path)})
    assert [lim.source for lim in limits] == ["--max-memory"]
    assert 10 * MiB < limits[0].used < GiB  # this Python process


def test_a_model_that_does_not_fit_the_cgroup_is_refused_by_name_with_the_limit_and_its_origin() -> None:
    cgroup = MemoryLimit(GiB, 200 * MiB, "cgroup", Path("/sys/fs/cgroup/system.slice/lanmesh.service/memory.max"))
    with pytest.raises(ModelTooBig) as refused:
        check_models_fit([("smollm2", 300 * MiB), ("big", 2 * GiB)], [cgroup])
    assert str(refused.value) == (
        "model big needs about 2.0 GiB, but only 524 MiB of the 1.0 GiB cgroup memory limit is free (set in "
        "/sys/fs/cgroup/system.slice/lanmesh.service/memory.max: systemd's MemoryMax= or a container's limit; "
        "200 MiB in use; 300 MiB go to smollm2, loaded before it). Serve fewer or smaller models (or a lower "
        "--precision), or raise the limit"
    )


def test_the_tighter_of_the_cgroup_and_max_memory_is_the_one_named() -> None:
    cgroup = MemoryLimit(8 * GiB, GiB, "cgroup", Path("/sys/fs/cgroup/memory.max"))
    flag = MemoryLimit(2 * GiB, 100 * MiB, "--max-memory")
    check_models_fit([("a", GiB)], [cgroup, flag])  # fits both
    with pytest.raises(ModelTooBig, match=r"^model b needs about 3\.0 GiB, but only 924 MiB of --max-memory 2\.0 GiB"):
        check_models_fit([("a", GiB), ("b", 3 * GiB)], [cgroup, flag])


def test_synthetic_models_need_nothing_and_always_fit() -> None:
    check_models_fit([("echo", 0), ("sleep:50", 0)], [MemoryLimit(100 * MiB, 100 * MiB, "--max-memory")])
