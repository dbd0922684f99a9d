"""deploy/systemd/lanmesh.service is a unit systemd accepts as written, with the settings the README promises."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from nodes.runtime.config import NodeConfig

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "deploy" / "systemd" / "lanmesh.service"
INSTALLED_LANMESH = "/opt/lanmesh/.venv/bin/lanmesh"  # where the README installs it


def _settings() -> dict[str, list[str]]:
    """KEY -> every value it is given in [Service] (systemd keys repeat)."""
    service: dict[str, list[str]] = {}
    section = ""
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
        elif line and not line.startswith("#") and section == "Service":
            key, _, value = line.partition("=")
            service.setdefault(key, []).append(value)
    return service


def _environment(service: dict[str, list[str]]) -> dict[str, str]:
    return dict(pair.split("=", 1) for value in service["Environment"] for pair in value.split())


def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian: apt-get install systemd)")
    lanmesh = Path(sys.executable).parent / "lanmesh"
    if not lanmesh.exists():
        pytest.skip(f"no lanmesh entry point at {lanmesh}: pip install -e . first")
    # verify checks that ExecStart's program exists: this checkout's entry point stands in for the installed one.
    text = UNIT.read_text()
    assert INSTALLED_LANMESH in text
    rendered = tmp_path / "lanmesh.service"
    rendered.write_text(text.replace(INSTALLED_LANMESH, str(lanmesh)))
    out = subprocess.run([analyze, "verify", str(rendered)], capture_output=True, text=True, timeout=60)
    # verify exits 0 even for unknown keys and bad values (it warns and ignores them): any output is a problem.
    assert out.returncode == 0 and not (out.stdout + out.stderr).strip(), out.stdout + out.stderr


def test_the_unit_is_a_notify_service_restarted_on_failure_with_a_watchdog_above_the_stall_timeout() -> None:
    service = _settings()
    env = _environment(service)
    assert service["Type"] == ["notify"] and service["NotifyAccess"] == ["main"]
    assert service["Restart"] == ["on-failure"] and service["KillSignal"] == ["SIGTERM"]
    assert service["ExecStart"] == [f"{INSTALLED_LANMESH} node"]
    watchdog = int(service["WatchdogSec"][0].removesuffix("s"))
    assert watchdog >= float(env["LANMESH_STALL_TIMEOUT"]) + 3  # the node's own watchdog says goodbye first
    assert int(service["TimeoutStopSec"][0].removesuffix("s")) > float(env["LANMESH_GRACE"]) + 10


def test_the_unit_limits_and_confines_the_node() -> None:
    service = _settings()
    for key in ("MemoryMax", "CPUQuota", "TasksMax"):
        assert service.get(key), f"{key} is not set"
    for key, value in {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "PrivateTmp": "yes"}.items():
        assert service[key] == [value]
    assert service["ProtectHome"] in (["yes"], ["read-only"], ["tmpfs"])


def test_the_keys_come_as_credentials_the_node_reads_from_its_credentials_directory() -> None:
    service = _settings()
    env = _environment(service)
    assert sorted(service["LoadCredential"]) == ["api.key:/etc/lanmesh/api.key", "mesh.key:/etc/lanmesh/mesh.key"]
    assert env["LANMESH_KEY_FILE"] == "%d/mesh.key" and env["LANMESH_API_KEY_FILE"] == "%d/api.key"
    # Every LANMESH_ variable the unit and its example environment file set is an option the node knows.
    example = (ROOT / "deploy" / "systemd" / "lanmesh.env").read_text()
    names = set(re.findall(r"^#?(LANMESH_\w+)=", example, re.MULTILINE)) | {k for k in env if k.startswith("LANMESH_")}
    options = {f"LANMESH_{name.upper()}" for name in NodeConfig.__dataclass_fields__}
    assert names <= options, names - options
