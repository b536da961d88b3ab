"""The modules of spj_edge import one another without cycles, counting the imports inside functions too: a cycle means
two modules each hold part of the other's knowledge."""
import ast

from conftest import REPO

PACKAGE = REPO / "spj_edge"


def module_name(path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Each module → the spj_edge modules it imports (`from . import x` counts as importing x)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        imported = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not (isinstance(node, ast.ImportFrom) and node.level):
                continue
            base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + [node.module or ""])
            base = base.rstrip(".")
            for alias in node.names:
                imported.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
        graph[name] = imported - {name}
    return graph


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, as the modules along it, or None."""
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> list[str] | None:
        state[module] = "open"
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                return path[path.index(target):] + [target]
            if target not in state and (found := visit(target, path + [target])):
                return found
        state[module] = "done"
        return None

    return next((found for m in sorted(graph) if m not in state and (found := visit(m, [m]))), None)


def test_the_finder_finds_a_cycle():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": set()}) is None


def test_spj_edge_has_no_import_cycle():
    graph = import_graph()
    assert "spj_edge.quantize" in graph["spj_edge.cli"]  # an import inside a function counts too
    assert cycle(graph) is None, " → ".join(cycle(graph))
