"""Work that needs torch (a model's conversion or export) runs in a child process, so the serving node never holds
torch (a first start would otherwise keep ~500 MB of it resident until the node restarts).

The child speaks JSON lines on stdout: `{"stage": ..., "fraction": ...}` for progress, then its result, or
`{"error": ...}`. Both pipes are read at once (a thread drains stderr), so a child that writes much to stderr can
never fill its pipe and block while the parent waits on stdout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

_REPO = Path(__file__).resolve().parents[3]  # the folder holding the `nodes` package
_STDERR_KEPT = 64 * 1024  # the end of the child's stderr, for the error message


class ChildError(RuntimeError):
    """The child failed; the message is its own error, or the end of its stderr."""


def emit(**fields: Any) -> None:
    """In the child: one JSON line to the parent."""
    print(json.dumps(fields), flush=True)


def run_child(module: str, args: list[str], report: Callable[[str, float], None]) -> dict[str, Any]:
    """Run `python -m module args...`, relaying its progress to `report`; returns its last JSON line (its result).
    Raises ChildError with the child's reason when it fails. A parent interrupted meanwhile kills the child."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_REPO), env.get("PYTHONPATH", "")) if p)
    proc = subprocess.Popen([sys.executable, "-m", module, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)  # fmt: skip
    assert proc.stdout is not None and proc.stderr is not None
    stderr: list[str] = []

    def drain(stream: Any) -> None:
        kept = 0
        for line in stream:
            stderr.append(line)
            kept += len(line)
            while kept > _STDERR_KEPT and len(stderr) > 1:
                kept -= len(stderr.pop(0))

    drainer = threading.Thread(target=drain, args=(proc.stderr,), name=f"stderr-{module}", daemon=True)
    drainer.start()
    last: dict[str, Any] = {}
    try:
        for line in proc.stdout:
            try:
                message = json.loads(line)
            except ValueError:
                continue
            if not isinstance(message, dict):
                continue
            last = message
            if "stage" in message:
                report(str(message["stage"]), float(message.get("fraction", 0.0)))
        code = proc.wait()
        drainer.join(5.0)
    finally:
        if proc.poll() is None:  # interrupted (the node is stopping): what it was making is never published
            proc.kill()
            proc.wait()
    if code == 0 and "error" not in last:
        return last
    lines = [line.strip() for line in "".join(stderr).splitlines() if line.strip()]
    reason = last.get("error") or (lines[-1][:500] if lines else "") or f"{module} exited with status {code}"
    raise ChildError(str(reason))
