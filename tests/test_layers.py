"""The package's layers, checked from its source: every import of one of its modules, at the top
of a file or inside a function, goes to the same layer or a lower one; no import cycle; no
module reaches into another's `_private` names; no module is longer than MAX_LINES.

    python -m pytest tests/test_layers.py
"""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lorahub_compeft"
MAX_LINES = 400
# lowest first; a module may import its own layer and the ones before it
LAYERS = [("config", "sampling"), ("io",), ("codecs",), ("store",), ("compose", "merge"),
          ("eval",), ("zoo",), ("cli",)]


def layer(module: str) -> int:
    """The layer of lorahub_compeft.<top>...; the package's own __init__ (the public API,
    gathered from every layer) is above them all."""
    parts = module.split(".")
    if len(parts) == 1:
        return len(LAYERS)
    return next((i for i, names in enumerate(LAYERS) if parts[1] in names), -1)


class Source:
    """One module's text, parsed, with what it imports from the package."""

    def __init__(self, name: str, text: str, is_package: bool, known: set[str]):
        self.name, self.tree, self.is_package = name, ast.parse(text), is_package
        self.lines = len(text.splitlines())
        self.imports = []  # (module, names taken from it, line); `from pkg import mod` -> pkg.mod
        self.bound = {}    # local name -> module, for `from pkg import mod [as m]`
        for node in ast.walk(self.tree):
            if isinstance(node, ast.Import):
                self.imports += [(a.name, [], node.lineno) for a in node.names
                                 if a.name.split(".")[0] == "lorahub_compeft"]
            elif isinstance(node, ast.ImportFrom):
                target = self.resolve(node)
                if not target or target.split(".")[0] != "lorahub_compeft":
                    continue
                names = []
                for alias in node.names:
                    if f"{target}.{alias.name}" in known:
                        self.imports.append((f"{target}.{alias.name}", [], node.lineno))
                        self.bound[alias.asname or alias.name] = f"{target}.{alias.name}"
                    else:
                        names.append(alias.name)
                if names:
                    self.imports.append((target, names, node.lineno))

    def resolve(self, node: ast.ImportFrom) -> str | None:
        if node.level == 0:
            return node.module
        base = self.name.split(".")
        base = base if self.is_package else base[:-1]
        base = base[: len(base) - (node.level - 1)]
        return ".".join(base + ([node.module] if node.module else []))


def parse(files: dict[str, tuple[str, bool]]) -> dict[str, Source]:
    """{module name: (source text, is a package __init__)} -> Sources."""
    return {name: Source(name, text, is_package, set(files))
            for name, (text, is_package) in files.items()}


def higher_layer_imports(sources: dict[str, Source]) -> list[str]:
    return [f"{s.name}:{line} imports {target}" for s in sources.values()
            for target, _, line in s.imports if layer(target) > layer(s.name)]


def unknown_layers(sources: dict[str, Source]) -> list[str]:
    return [name for name in sources if layer(name) < 0]


def import_cycles(sources: dict[str, Source]) -> list[str]:
    graph = {s.name: {t for t, _, _ in s.imports if t in sources and t != s.name}
             for s in sources.values() if s.name != "lorahub_compeft"}
    state, stack, cycles = {}, [], []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return cycles


def private_uses(sources: dict[str, Source]) -> list[str]:
    def private(name: str) -> bool:
        return name.startswith("_") and not name.startswith("__")
    found = [f"{s.name}:{line} imports {target}.{n}" for s in sources.values()
             for target, names, line in s.imports if target != s.name
             for n in names if private(n)]
    for s in sources.values():  # `from pkg import mod [as m]`, then m._private
        found += [f"{s.name}:{node.lineno} uses {s.bound[node.value.id]}.{node.attr}"
                  for node in ast.walk(s.tree)
                  if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                  and node.value.id in s.bound and private(node.attr)]
    return found


def package_files() -> dict[str, tuple[str, bool]]:
    files = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        files[".".join(parts[:-1] if is_package else parts)] = (path.read_text(), is_package)
    return files


SOURCES = parse(package_files())


def test_every_module_is_in_a_layer():
    assert not unknown_layers(SOURCES)


def test_no_module_imports_a_higher_layer():
    problems = higher_layer_imports(SOURCES)
    assert not problems, "\n".join(problems)


def test_no_import_cycles():
    cycles = import_cycles(SOURCES)
    assert not cycles, "\n".join(cycles)


def test_no_module_uses_another_modules_private_names():
    problems = private_uses(SOURCES)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("module", sorted(SOURCES))
def test_module_length(module):
    lines = SOURCES[module].lines
    assert lines <= MAX_LINES, f"{module} has {lines} lines; split it (at most {MAX_LINES})"


def test_the_checks_catch_each_kind_of_violation():
    """A small package written to break every rule: each check names what is wrong."""
    sources = parse({
        "lorahub_compeft.io": ("", True),
        "lorahub_compeft.io.files": ("from lorahub_compeft.cli.options import human_bytes\n"
                                     "from lorahub_compeft.io.models import _generate\n", False),
        "lorahub_compeft.io.models": ("from . import files\n"
                                      "def f():\n    return files._umask()\n", False),
        "lorahub_compeft.cli": ("", True),
        "lorahub_compeft.cli.options": ("def human_bytes(n):\n    return n\n", False),
        "lorahub_compeft.plugins": ("", False),
    })
    assert higher_layer_imports(sources) == [
        "lorahub_compeft.io.files:1 imports lorahub_compeft.cli.options"]
    assert import_cycles(sources) == [
        "lorahub_compeft.io.files -> lorahub_compeft.io.models -> lorahub_compeft.io.files"]
    assert sorted(private_uses(sources)) == [
        "lorahub_compeft.io.files:2 imports lorahub_compeft.io.models._generate",
        "lorahub_compeft.io.models:3 uses lorahub_compeft.io.files._umask"]
    assert unknown_layers(sources) == ["lorahub_compeft.plugins"]
