"""The package's import graph, read from the source with ast: every `import` and `from ...
import` in every module of mpagent, at module level and lazy ones inside functions alike (only
`if TYPE_CHECKING:` blocks, which never run, are left out). It has no cycle, and pure policy
never reaches I/O."""

from __future__ import annotations

import ast
from collections.abc import Iterable
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "mpagent"

# Pure policy: values in, values out.
PURE = {
    "tokens", "protocol", "errors", "console", "envfile", "ownkeys", "altinn", "texas", "loopback",
}  # fmt: skip
# mpagent modules (or subpackages) whose work is I/O: network, sockets, pipes, processes,
# files, the keyring, the terminal's command line.
IO_MODULES = {
    "adminapi", "agent", "altinnapi", "ask", "autostart", "bridge", "cli", "client", "httpapi", "loopserver",
    "configedit", "demo", "doctor", "emulator", "exchange", "fastcli", "fullcli", "issuer", "keywatch",
    "passwords", "peers", "pipeclient", "pipeserver", "postman", "private", "rotation", "server",
    "tokenfiles",
    "service", "systemd", "unlock", "watch",
}  # fmt: skip
IO_LIBRARIES = {
    "requests", "urllib3", "http", "socket", "_socket", "ssl", "asyncio", "selectors",
    "subprocess", "keyring", "watchdog", "win32pipe", "win32file", "pywintypes",
}  # fmt: skip


def module_sources(package: Path = PACKAGE) -> dict[str, str]:
    """Every module of the package by dotted name (a package by its own name)."""
    sources = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        sources[name] = path.read_text(encoding="utf-8")
    return sources


def _type_checking_only(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and (
        (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING")
        or (isinstance(node.test, ast.Attribute) and node.test.attr == "TYPE_CHECKING")
    )


def _imports(tree: ast.AST) -> Iterable[ast.Import | ast.ImportFrom | ast.Call]:
    """Every import statement, and importlib.import_module("...") with a literal, wherever it
    is, except under `if TYPE_CHECKING:`."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if _type_checking_only(node):
            stack.extend(getattr(node, "orelse", []))
            continue
        if isinstance(node, ast.Import | ast.ImportFrom) or (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute | ast.Name)
            and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def graph(sources: dict[str, str]) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(internal, external): for each module, the package's modules it imports, and the top-level
    names of the other modules it imports. `from P import name` is an edge to the submodule
    P.name when there is one, else to P. A parent package that Python imports first on the way
    to a submodule is no edge of its own."""
    internal: dict[str, set[str]] = {name: set() for name in sources}
    external: dict[str, set[str]] = {name: set() for name in sources}
    root = next(iter(sources)).split(".")[0]
    packages = {n for n in sources if any(m.startswith(n + ".") for m in sources)}

    def add(module: str, target: str) -> None:
        if target.split(".")[0] != root:
            external[module].add(target.split(".")[0])
        elif target in sources:
            internal[module].add(target)
        else:  # a name inside a module, or a module that does not exist: its nearest module
            while target not in sources and "." in target:
                target = target.rsplit(".", 1)[0]
            internal[module].add(target)

    for module, text in sources.items():
        package = module if module in packages else module.rsplit(".", 1)[0]
        for node in _imports(ast.parse(text, filename=module)):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    add(module, alias.name)
            elif isinstance(node, ast.Call):
                add(module, node.args[0].value)  # type: ignore[attr-defined]
            else:
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")
                    anchor = anchor[: len(anchor) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    add(module, full if full in sources else base)
    for module in internal:
        internal[module].discard(module)
    return internal, external


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(edges):
        if start not in state and (found := visit(start)):
            return found
    return None


def reach(edges: dict[str, set[str]], start: str) -> dict[str, list[str]]:
    """Every module reachable from start, each with the import path that reaches it."""
    paths = {start: [start]}
    todo = [start]
    while todo:
        node = todo.pop()
        for nxt in sorted(edges.get(node, ())):
            if nxt not in paths:
                paths[nxt] = [*paths[node], nxt]
                todo.append(nxt)
    return paths


def _short(name: str) -> str:
    return name.split(".")[1] if "." in name else name


def test_graph_sees_lazy_imports_and_cycles() -> None:
    """The reader finds a cycle closed by an import inside a function, resolves relative and
    `from P import submodule` imports, and ignores `if TYPE_CHECKING:` blocks."""
    sources = {
        "p": "",
        "p.a": "def f():\n    from p import b\n",
        "p.b": "from . import c\nif TYPE_CHECKING:\n    import p.d\n",
        "p.c": "import requests\ndef g():\n    import p.a\n",
        "p.d": "",
    }
    internal, external = graph(sources)
    assert internal["p.a"] == {"p.b"} and internal["p.b"] == {"p.c"}
    assert external["p.c"] == {"requests"}
    assert find_cycle(internal) == ["p.a", "p.b", "p.c", "p.a"]
    del sources["p.c"]
    assert find_cycle(graph(sources)[0]) is None


def test_import_graph_has_no_cycle() -> None:
    """No chain of imports between mpagent's modules, lazy imports included, leads back to
    where it started."""
    internal, _ = graph(module_sources())
    cycle = find_cycle(internal)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_pure_policy_reaches_no_io() -> None:
    """The pure policy modules (PURE) import, directly or through other mpagent
    modules, no I/O module and none of requests, socket, asyncio, subprocess, keyring, ..."""
    internal, external = graph(module_sources())
    problems = []
    for pure in sorted(PURE):
        for module, path in reach(internal, f"mpagent.{pure}").items():
            chain = " -> ".join(path)
            if _short(module) in IO_MODULES:
                problems.append(f"{chain} (I/O module)")
            for library in sorted(external[module] & IO_LIBRARIES):
                problems.append(f"{chain} -> {library}")
    assert not problems, "pure policy reaches I/O:\n" + "\n".join(problems)
