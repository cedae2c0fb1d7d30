"""The layout's rules, checked on the source: no import cycles among the modules of `pipeline` and
`stages`, no private name (`_x`) imported from another module, and the stages never imported by
the library (test_claims checks the direction)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def modules(root: Path = ROOT) -> dict[str, Path]:
    found = {}
    for package in ("pipeline", "stages"):
        for path in (root / package).rglob("*.py"):
            found[".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")] = path
    return found


def imports(mods: dict[str, Path]) -> tuple[dict[str, set[str]], list[str]]:
    """(module -> the package modules it imports, anywhere but under TYPE_CHECKING; private imports)."""
    edges: dict[str, set[str]] = {}
    private: list[str] = []
    for name, path in mods.items():
        tree = ast.parse(path.read_text())
        typing_only = {
            id(n)
            for node in ast.walk(tree)
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for n in ast.walk(node)
        }
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                targets = [node.module]
                for alias in node.names:
                    if f"{node.module}.{alias.name}" in mods:
                        targets.append(f"{node.module}.{alias.name}")
                    elif alias.name.startswith("_") and not alias.name.startswith("__"):
                        private.append(f"{name} imports {node.module}.{alias.name}")
            else:
                continue
            edges.setdefault(name, set()).update(t for t in targets if t in mods and t != name)
    return edges, private


def test_no_import_cycles_and_no_private_imports() -> None:
    mods = modules()
    edges, private = imports(mods)

    def reaches(a: str, b: str) -> bool:
        seen, todo = set(), [a]
        while todo:
            for m in edges.get(todo.pop(), ()):
                if m == b:
                    return True
                if m not in seen:
                    seen.add(m)
                    todo.append(m)
        return False

    def face(a: str, b: str) -> bool:  # a package's __init__ naming its own modules
        return (mods[a].name == "__init__.py" and b.startswith(a + ".")) or (
            mods[b].name == "__init__.py" and a.startswith(b + ".")
        )

    cycles = sorted(
        {tuple(sorted((a, b))) for a in edges for b in edges[a] if not face(a, b) and reaches(b, a)}
    )
    assert cycles == [] and private == []


def test_the_check_finds_what_it_looks_for(tmp_path: Path) -> None:
    """The checker itself: a cycle and a private import written on purpose are found."""
    (tmp_path / "pipeline").mkdir()
    (tmp_path / "stages").mkdir()
    (tmp_path / "pipeline" / "a.py").write_text("from pipeline.b import thing\n")
    (tmp_path / "pipeline" / "b.py").write_text("def f():\n    from pipeline.a import _hidden\n")
    edges, private = imports(modules(tmp_path))
    assert edges == {"pipeline.a": {"pipeline.b"}, "pipeline.b": {"pipeline.a"}}
    assert private == ["pipeline.b imports pipeline.a._hidden"]


def test_every_seeded_mutation_still_applies() -> None:
    """`make mutation` seeds bugs by replacing code as it is: when that code moves, the seed would be
    skipped ("not applied") instead of tested. Each must find its code."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("mutation", ROOT / "tests" / "mutation.py")
    assert spec and spec.loader
    mutation = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mutation)
    stale = [name for name, file, old, _, _ in mutation.SEEDED if old not in (ROOT / file).read_text()]
    assert stale == []
