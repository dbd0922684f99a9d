"""deploy/systemd/lanmesh.service is a unit systemd accepts as shipped, with the settings the README promises, and
`lanmesh systemd-unit` writes the same unit with this install's program in ExecStart=."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from nodes.cli.service_unit import install_problems, render, shipped_unit
from nodes.runtime.config import NodeConfig

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "deploy" / "systemd" / "lanmesh.service"
README_INSTALL = "/opt/lanmesh/.venv/bin"  # where the README installs it


def _settings(text: str | None = None) -> dict[str, list[str]]:
    """KEY -> every value it is given in [Service] (systemd keys repeat)."""
    service: dict[str, list[str]] = {}
    section = ""
    for line in (UNIT.read_text() if text is None else text).splitlines():
        line = line.strip()
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
        elif line and not line.startswith("#") and section == "Service":
            key, _, value = line.partition("=")
            service.setdefault(key, []).append(value)
    return service


def _environment(service: dict[str, list[str]]) -> dict[str, str]:
    return dict(pair.split("=", 1) for value in service["Environment"] for pair in value.split())


def _verify(unit: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian: apt-get install systemd)")
    out = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    # verify exits 0 even for unknown keys and bad values (it warns and ignores them): any output is a problem.
    assert out.returncode == 0 and not (out.stdout + out.stderr).strip(), out.stdout + out.stderr


def test_systemd_analyze_verify_accepts_the_unit_as_shipped() -> None:
    _verify(UNIT)  # on any machine: ExecStart= runs /usr/bin/env, which finds lanmesh in the unit's PATH


def test_lanmesh_systemd_unit_writes_the_shipped_unit_with_this_installs_program(tmp_path: Path) -> None:
    target = tmp_path / "lanmesh.service"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "nodes.cli", "systemd-unit", "--output", str(target)],
                          capture_output=True, text=True, timeout=60, env=env)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert f"wrote {target}" in done.stderr and "systemctl daemon-reload" in done.stderr
    assert target.stat().st_mode & 0o777 == 0o644
    text = target.read_text()
    bin_dir = Path(sys.executable).parent
    program = bin_dir / "lanmesh"
    expected = f"{program} node" if program.exists() else f"{sys.executable} -m nodes.cli node"
    service = _settings(text)
    assert service["ExecStart"] == [expected]
    assert _environment(service)["PATH"].startswith(f"{bin_dir}:")
    _verify(target)

    # Nothing else differs from the shipped unit: one source for both.
    def rest(unit: str) -> list[str]:
        return [line for line in unit.splitlines() if not line.startswith(("ExecStart=", "Environment=P", "# Wri"))]

    assert rest(text) == rest(UNIT.read_text())
    printed = subprocess.run([sys.executable, "-m", "nodes.cli", "systemd-unit"], capture_output=True, text=True,
                             timeout=60, env=env)  # fmt: skip
    assert printed.stdout == text


def test_the_package_carries_the_shipped_unit() -> None:
    assert shipped_unit() == UNIT.read_text()


def test_a_program_the_service_user_cannot_reach_is_named_with_the_fix() -> None:
    home = install_problems("/home/ana/venv/bin/lanmesh")
    assert len(home) == 1 and "ProtectHome=yes" in home[0] and "install lanmesh under /opt" in home[0]
    with tempfile.TemporaryDirectory() as folder:  # pytest's own tmp_path sits in a folder of mode 0700
        base = Path(folder)
        base.chmod(0o755)
        program = base / "private" / "bin" / "lanmesh"
        program.parent.mkdir(parents=True)
        program.write_text("#!/bin/sh\n")
        program.chmod(0o755)
        (base / "private").chmod(0o700)
        assert install_problems(str(program)) == [
            f"{base / 'private'} is not open to other users (mode 700), so the service's user cannot run {program}: "
            f"chmod o+x {base / 'private'}"
        ]
        (base / "private").chmod(0o755)
        assert install_problems(str(program)) == []
    unit = render(UNIT.read_text(), ["/opt/my lanmesh/bin/lanmesh"], {"PATH": "/opt/my lanmesh/bin:/usr/bin"})
    assert 'ExecStart="/opt/my lanmesh/bin/lanmesh" node' in unit
    assert 'Environment=PATH="/opt/my lanmesh/bin:/usr/bin"' in unit


def test_the_unit_is_a_notify_service_restarted_on_failure_with_a_watchdog_above_the_stall_timeout() -> None:
    service = _settings()
    env = _environment(service)
    assert service["Type"] == ["notify"] and service["NotifyAccess"] == ["main"]
    assert service["Restart"] == ["on-failure"] and service["KillSignal"] == ["SIGTERM"]
    assert service["ExecStart"] == ["/usr/bin/env lanmesh node"]
    assert env["PATH"].startswith(f"{README_INSTALL}:")
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
