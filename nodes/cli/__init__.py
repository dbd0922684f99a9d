"""The `lanmesh` command: `main.py` parses and dispatches, `console.py` is the terminal console (status, chat,
doctor), `model_commands.py` the model operations (`lanmesh models`, `lanmesh rollout`).

For `lanmesh node`, importing this package is the first code that runs (before `main.py` and its imports, about
0.1 s): it notes SIGTERM/SIGINT from here on, and `lanmesh node` turns a noted one into a graceful leave.
"""

import signal as _signal
import sys as _sys

early_signals: list[int] = []  # SIGTERM/SIGINT that came while `lanmesh node` had no node to stop yet


def note_early_signal(signum: int, _frame: object) -> None:
    early_signals.append(signum)


if _sys.argv[1:2] == ["node"]:
    try:
        _signal.signal(_signal.SIGTERM, note_early_signal)
        _signal.signal(_signal.SIGINT, note_early_signal)
    except ValueError:  # imported off the main thread (not as the command): signals are not ours to take
        pass
