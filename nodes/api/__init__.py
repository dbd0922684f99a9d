"""The node's HTTP API: OpenAI-compatible routes, /health, /metrics and the web console, behind a guard that keeps
hostile callers apart. Needs the `http` extra, except `keys.py`, which the node's configuration uses."""
