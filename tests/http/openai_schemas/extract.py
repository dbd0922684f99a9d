"""Cut OpenAI's published OpenAPI spec down to the four operations lanmesh serves, for the conformance tests.

    python tests/http/openai_schemas/extract.py openapi.json COMMIT > tests/http/openai_schemas/openapi.json

where openapi.json comes from https://github.com/openai/openai-openapi at COMMIT. Kept: those operations'
request bodies and responses, and every schema they reference (nothing rewritten, only `x-oaiMeta` examples
dropped).
"""

from __future__ import annotations

import json
import sys
from typing import Any

OPERATIONS = {"/chat/completions": "post", "/completions": "post", "/embeddings": "post", "/models": "get"}
SOURCE = "https://github.com/openai/openai-openapi"


def _refs(node: Any, found: set[str], spec: dict[str, Any]) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                kind, name = value.split("/")[-2:]
                if (kind, name) not in found:
                    found.add((kind, name))  # type: ignore[arg-type]
                    _refs(spec["components"][kind][name], found, spec)
            else:
                _refs(value, found, spec)
    elif isinstance(node, list):
        for value in node:
            _refs(value, found, spec)


def subset(spec: dict[str, Any], commit: str) -> dict[str, Any]:
    paths: dict[str, Any] = {}
    for path, method in OPERATIONS.items():
        operation = {k: v for k, v in spec["paths"][path][method].items() if k != "x-oaiMeta"}
        paths[path] = {method: operation}
    found: set[Any] = set()
    _refs(paths, found, spec)
    components: dict[str, dict[str, Any]] = {}
    for kind, name in sorted(found):
        components.setdefault(kind, {})[name] = spec["components"][kind][name]
    info = {
        "title": "OpenAI API: the operations lanmesh serves",
        "version": spec["info"]["version"],
        "x-source": f"{SOURCE}/blob/{commit}/openapi.json",
    }
    servers = [{"url": "http://127.0.0.1:8000/v1"}]
    return {"openapi": spec["openapi"], "info": info, "servers": servers, "paths": paths, "components": components}


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        full = json.load(f)
    json.dump(subset(full, sys.argv[2]), sys.stdout, indent=1, ensure_ascii=False)
    sys.stdout.write("\n")
