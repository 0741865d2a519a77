"""The shape of chat/: no import cycles, only the provider layer imports a provider
SDK or an HTTP client, no file over 450 lines, server frames built only in
chat/generation/frames.py, and no imports inside functions except those listed below
with their reason.

``python -m tests.test_architecture`` prints the import graph and any cycle.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

CHAT = Path(__file__).resolve().parent.parent / "chat"
MAX_LINES = 450
FRAMES_MODULE = CHAT / "generation" / "frames.py"
# Every "type" the server puts in a frame or a channel-layer message of its own.
FRAME_TYPES = {
    "state", "message", "generation.start", "delta", "reasoning", "generation.end", "conversation",
    "conversation.deleted", "error", "chat.frame", "generation.stop", "generation.sync",
    "generation.snapshot", "worker.stats.reply", "generation.handover",
}
# Imports inside functions that are allowed, (file, imported module): why.
LOCAL_IMPORTS = {
    ("accounting.py", "tiktoken"): "loading the tokenizer takes a while; only when counting",
    ("accounting.py", "models"): "accounting is imported by the loopback upstream outside "
    "Django (bench.upstream), where models cannot be imported",
    ("apps.py", "checks"): "Django's pattern: system checks are registered in ready()",
}


def python_files() -> list[Path]:
    return sorted(p for p in CHAT.rglob("*.py") if "migrations" not in p.parts)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(CHAT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(tree: ast.Module):
    """Every import node of a module, those inside functions included (a cycle hidden
    by an import inside a function is still a cycle); ``if TYPE_CHECKING:`` left out."""
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(child) for child in ast.walk(node))
        elif isinstance(node, ast.Import | ast.ImportFrom) and id(node) not in skipped:
            yield node


def import_graph() -> dict[str, set[str]]:
    """``{module: modules of chat it imports}``. ``from pkg import x``
    where x is a submodule is an edge to ``pkg.x``; importing ``pkg.x`` from outside
    ``pkg`` also runs ``pkg/__init__``, so it is an edge to ``pkg`` too."""
    modules = {module_name(p): p for p in python_files()}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges: set[str] = set()
        for node in _imports(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")
                    anchor = anchor[: len(anchor) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                # ``from <own package> import x``: x, not the package being imported.
                own = name.startswith(base + ".")
                targets = [] if own else [base]
                targets += [f"{base}.{alias.name}" for alias in node.names]
            for target in targets:
                if target not in modules or target == name:
                    continue
                edges.add(target)
                parent = target.rpartition(".")[0]
                # Leaving the package through its __init__ (siblings do not re-run it).
                if parent in modules and not name.startswith(parent + ".") and parent != name:
                    edges.add(parent)
        graph[name] = edges
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in graph.get(node, ()):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def test_chat_has_no_import_cycle():
    assert find_cycles(import_graph()) == []


def test_dependencies_go_one_way_consumers_and_api_then_runtime_then_store_then_models():
    graph = import_graph()
    below_runtime = ["chat.generation.store", "chat.generation.state", "chat.generation.prompt",
                     "chat.generation.errors", "chat.generation.frames", "chat.models"]
    for module in below_runtime:
        for dependency in graph[module]:
            assert not dependency.startswith(("chat.consumers", "chat.api")), (module, dependency)
            assert dependency not in {"chat.generation.runtime", "chat.generation.task",
                                      "chat.generation.service"}, (module, dependency)
    assert not {d for d in graph["chat.generation.frames"] if d.startswith("chat.")}
    assert graph["chat.generation.errors"] <= {"chat.generation.frames"}


# The provider layer: the only package that may import a provider's SDK or an HTTP
# client, so another provider API is one new module there (docs/architecture.md).
PROVIDER_LAYER = "chat.generation.providers"
PROVIDER_LIBRARIES = {"openai", "httpx", "httpx2", "httpcore", "httpcore2"}


def test_only_the_provider_layer_imports_a_provider_sdk_or_http_client():
    found = []
    for path in python_files():
        name = module_name(path)
        if name == PROVIDER_LAYER or name.startswith(PROVIDER_LAYER + "."):
            continue
        for node in _imports(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                roots = [alias.name.partition(".")[0] for alias in node.names]
            else:
                roots = [] if node.level else [(node.module or "").partition(".")[0]]
            found += [f"{name}:{node.lineno} {root}" for root in roots
                      if root in PROVIDER_LIBRARIES]
    assert found == []


def test_no_python_file_in_chat_is_over_450_lines():
    long = {str(p.relative_to(CHAT)): n for p in python_files()
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_server_frames_are_built_only_in_the_frames_module():
    found = []
    for path in python_files():
        if path == FRAMES_MODULE:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Dict):
                continue
            for key, value in zip(node.keys, node.values, strict=True):
                if (isinstance(key, ast.Constant) and key.value == "type"
                        and isinstance(value, ast.Constant) and value.value in FRAME_TYPES):
                    found.append(f"{path.relative_to(CHAT)}:{node.lineno} {value.value}")
    assert found == []


def test_imports_inside_functions_are_only_the_listed_ones():
    found = []
    for path in python_files():
        for function in ast.walk(ast.parse(path.read_text())):
            if not isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for node in ast.walk(function):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom):
                    names = [node.module or alias.name for alias in node.names]
                else:
                    continue
                for name in names:
                    if (path.name, name.rpartition(".")[2] or name) not in LOCAL_IMPORTS:
                        found.append(f"{path.relative_to(CHAT)}:{node.lineno} {name}")
    assert found == []


if __name__ == "__main__":
    graph = import_graph()
    for module in sorted(graph):
        print(f"{module} -> {', '.join(sorted(graph[module])) or '(nothing in chat)'}")
    cycles = find_cycles(graph)
    print(f"\n{len(graph)} modules, {sum(map(len, graph.values()))} edges; "
          f"cycles: {cycles or 'none'}")
    sys.exit(1 if cycles else 0)
