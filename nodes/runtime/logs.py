"""Structured logs: every line carries the node id, as key=value text or as JSON."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import TextIO

_STD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}


class _Format(logging.Formatter):
    def __init__(self, node: str, as_json: bool) -> None:
        super().__init__()
        self.node = node
        self.as_json = as_json

    def format(self, record: logging.LogRecord) -> str:
        fields = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "node": self.node,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields.update({k: v for k, v in vars(record).items() if k not in _STD})
        if record.exc_info:
            fields["exc"] = self.formatException(record.exc_info)
        if self.as_json:
            return json.dumps(fields, default=str)
        return " ".join(f"{k}={_quote(v)}" for k, v in fields.items())


def _quote(v: object) -> str:
    s = str(v)
    return json.dumps(s) if (not s or any(c in s for c in ' "=\n')) else s


# The node's own loggers: "lanmesh.*", and the modules that log under their own names (nodes.*, mesh.*).
OURS = ("lanmesh", "nodes", "mesh")
# What the libraries a node calls would print on their own, outside the log: torch's exporter (4 "torchvision is
# not installed" warnings per MiniLM export, in torch's own format and handler) and transformers (its own handler)
# unless --log-level debug; progress bars never (transformers' GGUF de-quantizing bar is a bare tqdm), since they
# would tear the node's own progress line. Each only where the operator has not set it.
_QUIET_LIBRARIES = {
    "TORCH_LOGS": "-all",  # torch's loggers at ERROR
    "TRANSFORMERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
}
_NO_PROGRESS_BARS = {
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TQDM_DISABLE": "1",  # every tqdm bar (tqdm reads TQDM_<ARG> defaults)
}


def setup(node: str, level: str = "info", fmt: str = "text", stream: TextIO | None = None) -> None:
    """Every log line of this process in one format on `stream` (stderr): the node's own at `level`, the
    libraries' (and Python warnings they raise) only when they are errors, or at `--log-level debug` from warnings
    up. Libraries that print outside logging are told not to (env vars, read when they are imported)."""
    debug = level.lower() == "debug"
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(_Format(node, fmt == "json"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING if debug else logging.ERROR)
    for name in OURS:
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.setLevel(level.upper())
        logger.propagate = True
    logging.captureWarnings(True)  # warnings.warn() becomes a record of "py.warnings", a library's like any other
    for name, value in {**_NO_PROGRESS_BARS, **({} if debug else _QUIET_LIBRARIES)}.items():
        os.environ.setdefault(name, value)
