"""No import cycles across jaxsink and its converter taken together: `convert/` installed as
`jaxsink.convert`, module-level and in-function imports, `TYPE_CHECKING` blocks left out.
(`lint-imports`, run by .ci/run, checks each package's contracts; it cannot see the converter
inside `jaxsink`, so the edges between the two are checked here.) And no test module imports
another: what the tests share lives in `tests/support`."""

from __future__ import annotations

import ast
import collections
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"jaxsink": ROOT / "jaxsink", "jaxsink.convert": ROOT / "convert"}


def modules() -> dict[str, Path]:
    """Every module's dotted name -> its file."""
    out = {}
    for package, folder in PACKAGES.items():
        for f in folder.rglob("*.py"):
            parts = [p for p in f.relative_to(folder).with_suffix("").parts if p != "__init__"]
            out[".".join([package, *parts])] = f
    return out


def imports_of(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The known modules `name` imports (a `from package import module` counts as the
    module), outside `if TYPE_CHECKING:` blocks."""
    tree = ast.parse(path.read_text())
    skipped = {
        id(sub)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for sub in ast.walk(node)
    }

    def known_prefix(target: str) -> str | None:
        while target and target not in known:
            target = target.rpartition(".")[0]
        return target or None

    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import | ast.ImportFrom):
            base, names = imported_names(node, package)
            targets = [n if n in known else base for n in names] if base else names
            found |= {m for t in targets if (m := known_prefix(t)) and m != name}
    return found


def imported_names(node: ast.Import | ast.ImportFrom, package: str) -> tuple[str | None, list]:
    """What an import statement in a module of `package` names, absolute: (None, the modules)
    for `import a.b, c`; (the module imported from, `module.name` for each name) for
    `from module import name` (relative ones resolved against `package`)."""
    if isinstance(node, ast.Import):
        return None, [a.name for a in node.names]
    base = node.module or ""
    if node.level:
        up = package
        for _ in range(node.level - 1):
            up = up.rpartition(".")[0]
        base = f"{up}.{base}" if base else up
    return base, [f"{base}.{a.name}" for a in node.names]


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            part = []
            while not part or part[-1] != v:
                part.append(stack.pop())
                on.discard(part[-1])
            if len(part) > 1:
                out.append(sorted(part))

    for v in list(edges):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles_across_jaxsink_and_the_converter():
    known = modules()
    assert {"jaxsink.engine", "jaxsink.convert.hf", "jaxsink.convert"} <= set(known)
    edges = collections.defaultdict(set)
    for name, path in known.items():
        edges[name] = imports_of(name, path, known)
    assert "jaxsink.files" in edges["jaxsink.convert.hf"]  # the two are seen together
    assert "jaxsink.convert" in edges["jaxsink.default_model"]
    assert cycles(edges) == []


def test_the_cycle_finder_finds_a_cycle():
    edges = collections.defaultdict(set, {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}})
    assert cycles(edges) == [["a", "b", "c"]]


def imported_test_modules(source: str, package: str) -> set[str]:
    """The `tests.test_*` modules a file of `package` (`tests`, `tests.support`) imports, in
    any form: `import tests.test_x`, `from tests.test_x import y`, `from tests import test_x`,
    relative, at module level or in a function."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import | ast.ImportFrom):
            base, names = imported_names(node, package)
            names = names if base is None else [base, *names]
            found |= {
                m.group(1) for n in names if (m := re.fullmatch(r"(tests\.test_\w+)(\..*)?", n))
            }
    return found


def test_no_test_module_imports_another():
    """Helpers the tests share live in `tests/support`: no file under tests/ imports a
    `tests.test_*` module (importing one runs its module-level code, and ties its edits to
    another test file's)."""
    found = {}
    for path in sorted((ROOT / "tests").rglob("*.py")):
        package = ".".join(path.parent.relative_to(ROOT).parts)
        if modules := imported_test_modules(path.read_text(), package):
            found[str(path.relative_to(ROOT))] = sorted(modules)
    assert found == {}, f"move what these import from test modules into tests/support: {found}"


def test_the_test_import_finder_sees_every_form():
    forms = {
        "import tests.test_a": "tests",
        "from tests.test_a import x": "tests",
        "from tests import support, test_a": "tests",
        "from . import test_a": "tests",
        "from .test_a import x": "tests",
        "from ..test_a import x": "tests.support",
        "def f():\n    from tests.test_a.b import x": "tests.support",
    }
    for source, package in forms.items():
        assert imported_test_modules(source, package) == {"tests.test_a"}, source
    others = "import tests.testing\nfrom tests.support import test_a\nfrom . import test_a"
    assert imported_test_modules(others, "tests.support") == set()
