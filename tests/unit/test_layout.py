"""The shape of the code, as rules a change cannot quietly break: who may import whom, no import circles (lazy and
type-checking imports included), one public face for `mesh`, and no module that needs a table of contents."""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("protocol", "mesh", "nodes", "bench")
# Who may import whom: each package only from those before it (tests may import everything).
ORDER = {"protocol": 0, "mesh": 1, "nodes": 2, "bench": 3}
# Inside nodes/, the rooms in the same way: models <- api <- runtime <- cli.
ROOMS = {"models": 0, "api": 1, "runtime": 2, "cli": 3}
MAX_LINES = 600


def _modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> Iterator[tuple[str, int]]:
    """Every project module `name` imports, anywhere in it (functions and `if TYPE_CHECKING:` blocks too)."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            submodules = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in MODULES]
            if len(submodules) < len(node.names):
                yield target, node.lineno
            for module in submodules:  # `from pkg import module` imports the module (the package is its parent)
                yield module, node.lineno


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {name: set() for name in MODULES}
    for name, path in MODULES.items():
        for target, _line in _imports(name, path):
            if target in MODULES and target != name:
                graph[name].add(target)
    return graph


def test_nothing_outside_mesh_imports_its_private_modules() -> None:
    pattern = re.compile(r"\b(from\s+mesh\._\w+\s+import|import\s+mesh\._\w+|from\s+mesh\s+import\s+_\w+)")
    offenders = []
    for path in sorted(REPO.rglob("*.py")):
        rel = path.relative_to(REPO)
        if rel.parts[0] in ("mesh", ".venv", "build") or "site-packages" in rel.parts:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line):  # code in strings too: subprocesses run it
                offenders.append(f"{rel}:{number}: {line.strip()}")
    assert not offenders, "import these from mesh's public face (`from mesh import X`):\n" + "\n".join(offenders)


def test_imports_point_one_way_protocol_mesh_nodes_bench() -> None:
    offenders = []
    for name, path in MODULES.items():
        top = name.split(".")[0]
        for target, line in _imports(name, path):
            other = target.split(".")[0]
            if other in ORDER and ORDER[other] > ORDER[top]:
                offenders.append(f"{path.relative_to(REPO)}:{line}: {top} imports {target}")
    assert not offenders, "\n".join(offenders)


def test_protocol_is_pure() -> None:
    allowed = {"msgpack", "__future__"}
    offenders = []
    for name, path in MODULES.items():
        if not name.startswith("protocol"):
            continue
        for target, line in _imports(name, path):
            root = target.split(".")[0]
            if root in allowed or root == "protocol" or root in _STDLIB_PURE:
                continue
            offenders.append(f"{path.relative_to(REPO)}:{line}: {target}")
    assert not offenders, "protocol/ imports stdlib (no I/O) and msgpack only:\n" + "\n".join(offenders)


# threading: a Packer per thread (`threading.local`); protocol/ never starts a thread.
_STDLIB_PURE = {"dataclasses", "enum", "typing", "collections", "struct", "math", "re", "itertools", "functools",
                "threading"}  # fmt: skip


def test_rooms_of_nodes_import_only_the_rooms_before_them() -> None:
    offenders = []
    for name, path in MODULES.items():
        parts = name.split(".")
        if parts[0] != "nodes" or len(parts) < 2:
            continue
        room = parts[1]
        assert room in ROOMS, f"{path.relative_to(REPO)}: nodes/ holds only the rooms {sorted(ROOMS)}"
        for target, line in _imports(name, path):
            tparts = target.split(".")
            if tparts[0] == "nodes" and len(tparts) > 1 and tparts[1] in ROOMS and ROOMS[tparts[1]] > ROOMS[room]:
                offenders.append(f"{path.relative_to(REPO)}:{line}: nodes.{room} imports {target}")
    assert not offenders, "\n".join(offenders)


def test_there_is_no_import_circle_even_through_lazy_imports() -> None:
    graph = _graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not circles, "modules that import each other (directly or round a circle):\n" + "\n".join(
        " <-> ".join(c) for c in circles
    )


@pytest.mark.parametrize("package", PACKAGES)
def test_no_module_needs_a_table_of_contents(package: str) -> None:
    long = {
        str(path.relative_to(REPO)): n
        for name, path in MODULES.items()
        if name.split(".")[0] == package and (n := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_mesh_has_one_public_face() -> None:
    import mesh

    missing = [name for name in mesh.__all__ if not hasattr(mesh, name)]
    assert not missing, f"mesh.__all__ names what mesh does not have: {missing}"


def test_the_backoff_schedules_in_the_docs_are_the_code_s() -> None:
    from mesh import backoff_schedules

    doc = (REPO / "docs" / "ARCHITECTURE.md").read_text()
    for name, text in backoff_schedules().items():
        assert text in doc, f"docs/ARCHITECTURE.md should quote the {name} backoff as the code has it: {text}"


def test_every_module_named_in_a_string_exists() -> None:
    """Module paths in strings (what a child process runs with `python -m`, a logger's name) move with the code: a
    stale one fails only when that path runs."""
    import importlib.util

    mod = r"((?:protocol|mesh|nodes|bench|tests)(?:\.[a-z_]+)+)"
    patterns = [
        re.compile(rf"""["']-m["']\s*,\s*["']{mod}["']"""),  # [sys.executable, "-m", "nodes.cli", ...]
        re.compile(rf"""-m\s+{mod}\b"""),  # "python -m nodes.cli" in text
        re.compile(rf"""(?:getLogger\(|logger=)["']{mod}["']"""),
    ]
    stale = []
    for path in sorted(REPO.glob("*/**/*.py")):
        rel = path.relative_to(REPO)
        if rel.parts[0] not in (*PACKAGES, "tests"):
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            for pattern in patterns:
                for name in pattern.findall(line):
                    try:
                        found = importlib.util.find_spec(name) is not None
                    except ModuleNotFoundError:  # its parent package is gone too
                        found = False
                    if not found:
                        stale.append(f"{rel}:{number}: {name}")
    assert not stale, "strings naming modules that do not exist:\n" + "\n".join(stale)


def test_test_modules_have_unique_names() -> None:
    """pytest imports test modules by basename (no packages under tests/):
    two files of one name abort the whole collection in a clean checkout."""
    seen: dict[str, Path] = {}
    clashes = []
    for path in sorted((REPO / "tests").rglob("test_*.py")):
        if path.name in seen:
            clashes.append(f"{seen[path.name].relative_to(REPO)} and {path.relative_to(REPO)}")
        seen.setdefault(path.name, path)
    assert not clashes, clashes
