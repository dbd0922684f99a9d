"""`lanmesh systemd-unit`: the service unit shipped as deploy/systemd/lanmesh.service, with ExecStart= naming this
install's own `lanmesh` (the shipped one looks it up in PATH, /opt/lanmesh/.venv/bin first), so the unit runs the
program that wrote it wherever it was installed."""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import stat
import sys
from importlib import resources
from pathlib import Path
from typing import Any

DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"
UNIT_FILE = "/etc/systemd/system/lanmesh.service"


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "systemd-unit",
        help="write a systemd unit that runs this install of lanmesh as a service",
        description=(
            "Print (or write with --output) the systemd service unit shipped as deploy/systemd/lanmesh.service, "
            "with ExecStart= naming this install's lanmesh program, so `systemd-analyze verify` and systemd find it "
            "wherever lanmesh was installed. Settings still go in /etc/lanmesh/lanmesh.env, and the keys in "
            "/etc/lanmesh (see README.md, 'Run as a service')."
        ),
        epilog=f"example:\n  sudo lanmesh systemd-unit --output {UNIT_FILE}\n"
        "  sudo systemctl daemon-reload && sudo systemctl enable --now lanmesh",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--output", "-o", metavar="FILE", help=f"write the unit there (mode 0644), e.g. {UNIT_FILE}")
    p.set_defaults(func=cmd_systemd_unit)


def shipped_unit() -> str:
    """The unit as shipped (package data: a link to deploy/systemd/lanmesh.service in a checkout)."""
    return resources.files("nodes.cli").joinpath("lanmesh.service").read_text()


def this_install() -> tuple[list[str], dict[str, str]]:
    """The command that runs this install's `lanmesh`, and environment it needs (PATH; PYTHONPATH for a checkout
    that was never installed)."""
    bin_dir = Path(sys.executable).parent  # not resolved: a venv's python is a link to the system's
    program = bin_dir / "lanmesh"
    env = {"PATH": f"{bin_dir}:{DEFAULT_PATH}"}
    if program.is_file() and os.access(program, os.X_OK):
        return [str(program)], env
    spec = importlib.util.find_spec("nodes")
    root = Path(next(iter(spec.submodule_search_locations or []))).parent if spec else None
    if root is not None and not _importable_without(root):
        env["PYTHONPATH"] = str(root)
    return [sys.executable, "-m", "nodes.cli"], env


def _importable_without(root: Path) -> bool:
    """Whether `nodes` lives in the interpreter's own site-packages (else it is found through PYTHONPATH/cwd)."""
    return "site-packages" in root.parts or "dist-packages" in root.parts


def _quote(word: str) -> str:
    return f'"{word}"' if re.search(r'[\s"\\\\]', word) else word


def render(template: str, command: list[str], env: dict[str, str]) -> str:
    """`template` with ExecStart= running `command node` and Environment=PATH= (and the other `env`) set."""
    exec_start = "ExecStart=" + " ".join(_quote(w) for w in [*command, "node"])
    lines = [f"Environment={k}={_quote(v)}" for k, v in env.items()]
    out, count = re.subn(r"^Environment=PATH=.*$", "\n".join(lines), template, count=1, flags=re.MULTILINE)
    out, count2 = re.subn(r"^ExecStart=.*$", exec_start, out, count=1, flags=re.MULTILINE)
    if count != 1 or count2 != 1:
        raise ValueError("the shipped unit has no ExecStart= or Environment=PATH= line to fill in")
    head = f"# Written by `lanmesh systemd-unit` for {command[0] if len(command) == 1 else ' '.join(command)}.\n"
    return head + out


def install_problems(program: str) -> list[str]:
    """Why the service (a user of its own, /home hidden) could not run `program`, if it could not."""
    path = Path(program)
    problems: list[str] = []
    if path.parts[1:2] in (("home",), ("root",)):
        problems.append(
            f"{program} is under /{path.parts[1]}, which the unit hides from the service (ProtectHome=yes) and its "
            "own user cannot read: install lanmesh under /opt (README.md, 'Run as a service')"
        )
        return problems
    for step in [*reversed(path.parents), path][1:]:  # every folder below / and the program itself
        try:
            mode = step.stat().st_mode
        except OSError:
            continue
        if not mode & stat.S_IXOTH:
            problems.append(f"{step} is not open to other users (mode {stat.S_IMODE(mode):o}), so the service's "
                            f"user cannot run {program}: chmod o+x {step}")  # fmt: skip
            break
    return problems


def cmd_systemd_unit(args: argparse.Namespace) -> int:
    command, env = this_install()
    try:
        unit = render(shipped_unit(), command, env)
    except (OSError, ValueError) as exc:
        print(f"lanmesh systemd-unit: cannot read the shipped unit: {exc}", file=sys.stderr)
        return 1
    for problem in install_problems(command[0]):
        print(f"lanmesh systemd-unit: warning: {problem}", file=sys.stderr)
    if not args.output:
        sys.stdout.write(unit)
        return 0
    target = Path(args.output)
    try:
        target.write_text(unit)
        target.chmod(0o644)
    except OSError as exc:
        print(f"lanmesh systemd-unit: cannot write {target}: {exc.strerror or exc} (as root: sudo)", file=sys.stderr)
        return 1
    print(f"wrote {target} (ExecStart={' '.join(command)} node)", file=sys.stderr)
    print("next: systemctl daemon-reload && systemctl enable --now lanmesh", file=sys.stderr)
    return 0
