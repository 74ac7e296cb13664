"""The module layout keeps its promises, read from the source (no framework imported):

- no import cycle among the project's modules, counting the imports inside function
  bodies (which hide a cycle from the import system until the function runs) and
  leaving out ``if TYPE_CHECKING:`` blocks (annotations only);
- across packages only public names: ``cle_torch`` and ``cle_onnx`` import nothing whose
  path has a private part (``cle_core._files``, ``cle_onnx._evaluate``) from another
  package, and the command line (``cle_core._cli``) imports no backend package at all.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("cle_core", "cle_onnx", "cle_torch")


def _modules() -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, is a package)."""
    mods = {}
    for pkg in PACKAGES:
        for f in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(f.relative_to(ROOT).with_suffix("").parts)
            is_pkg = parts[-1] == "__init__"
            mods[".".join(parts[:-1] if is_pkg else parts)] = (f, is_pkg)
    return mods


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return skip


def _imports(module: str, path: Path, is_pkg: bool, mods: dict) -> list[tuple[str, int, bool]]:
    """(imported module, line, inside a function) for every import of ``module``,
    resolved to a module of ``mods`` where it names one, else to the dotted name."""
    tree = ast.parse(path.read_text())
    skip = _type_checking_nodes(tree)
    in_function = {
        id(n)
        for f in ast.walk(tree)
        if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
        for n in ast.walk(f)
    }
    found = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        targets = []
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_pkg else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # ``from . import x`` imports the module x where there is one.
            targets = [
                f"{target}.{a.name}" if f"{target}.{a.name}" in mods else target for a in node.names
            ]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        found += [(t, node.lineno, id(node) in in_function) for t in targets]
    return found


def test_no_import_cycles():
    mods = _modules()
    edges: dict[str, dict[str, str]] = {m: {} for m in mods}
    for m, (path, is_pkg) in mods.items():
        for target, line, inside in _imports(m, path, is_pkg, mods):
            if target in mods and target != m:
                where = f"{path.relative_to(ROOT)}:{line}" + (" (in a function)" if inside else "")
                edges[m].setdefault(target, where)

    cycles = []

    def visit(node: str, stack: list[str], done: set[str]) -> None:
        for nxt in edges[node]:
            if nxt in stack:
                loop = [*stack[stack.index(nxt) :], nxt]
                hops = zip(loop, loop[1:], strict=False)
                cycles.append(" -> ".join(f"{a} [{edges[a][b]}]" for a, b in hops))
            elif nxt not in done:
                visit(nxt, [*stack, nxt], done)
        done.add(node)

    done: set[str] = set()
    for m in mods:
        if m not in done:
            visit(m, [m], done)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_packages_use_only_public_names_of_each_other():
    mods = _modules()
    wrong = []
    for m, (path, is_pkg) in mods.items():
        own = m.split(".")[0]
        for target, line, _ in _imports(m, path, is_pkg, mods):
            top = target.split(".")[0]
            if top not in PACKAGES or top == own:
                continue
            where = f"{path.relative_to(ROOT)}:{line}"
            if m.startswith("cle_core._cli"):
                wrong.append(f"{where}: the command line imports the backend package {target}")
            elif any(part.startswith("_") for part in target.split(".")[1:]):
                wrong.append(f"{where}: {m} imports the private {target}")
    assert not wrong, "\n".join(dict.fromkeys(wrong))


def test_the_checks_see_what_they_look_for(tmp_path, monkeypatch):
    """Both tests above can fail: on a cycle hidden in a function body and on a private
    import across packages."""
    for pkg in ("cle_core", "cle_onnx"):
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text("")
    (tmp_path / "cle_torch").mkdir()
    (tmp_path / "cle_torch" / "__init__.py").write_text("")
    (tmp_path / "cle_onnx" / "_a.py").write_text("from ._b import x\n")
    (tmp_path / "cle_onnx" / "_b.py").write_text(
        "def x():\n    from ._a import y\n\nimport cle_core._files\n"
    )
    monkeypatch.setitem(globals(), "ROOT", tmp_path)
    for test, expected in (
        (test_no_import_cycles, "(in a function)"),
        (test_packages_use_only_public_names_of_each_other, "private cle_core._files"),
    ):
        try:
            test()
        except AssertionError as exc:
            assert expected in str(exc)
        else:
            raise AssertionError(f"{test.__name__} passed on a broken layout")
