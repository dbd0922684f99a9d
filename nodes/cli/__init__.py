"""The `lanmesh` command: `main.py` parses and dispatches, `console.py` is the terminal console (status, chat,
doctor), `model_commands.py` the model operations (`lanmesh models`, `lanmesh rollout`)."""
