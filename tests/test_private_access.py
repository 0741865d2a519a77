"""Our code uses other packages through their public APIs; each exception is listed
here with its reason, and a new one fails this test until it is listed (or removed).

An AST walk of chat/ and chatproject/ finds:

- every read or write of an attribute named ``_x`` (one leading underscore) that is not
  ours: on ``self``/``cls``/``super()``, one that a base class from another package
  defines or uses (found by importing the class and reading its bases' code objects);
  on any other object, every write, and a read of a name our code base never defines
  (no ``def _x``, no ``_x = ...`` in a class or module, no ``self._x = ...`` of a class
  of ours);
- ``getattr``/``setattr``/``hasattr``/``delattr`` with such a name as a string constant;
- ``from package import _x`` from another package;
- and, private or not, an assignment to an attribute of a module or class imported from
  another package (``tcp.Connection.write = ...``: a process-wide monkeypatch).

A heuristic, not a type checker: reading ``obj._x`` of another package's object is
missed when our code happens to define a ``_x`` of its own.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import textwrap
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OURS = ("chat", "chatproject")
CHANNELS_REDIS = ("channels-redis==4.3.0 internals, all in chat/channels_redis_adapter.py "
                  "(tests/test_channels_redis_adapter.py checks them)")

# (file, kind, name): why. kind: "read", "write", "import" or "override" (a method
# replacing a base class's private one) for private names, or "patch" (an assignment
# to another package's module or class attribute).
ALLOWED: dict[tuple[str, str, str], str] = {
    # The batching pub/sub layer subclasses channels-redis's layer, per-loop layer and
    # shard: it rebuilds the per-loop layer as _get_layer does and keeps the shard's
    # subscription state as its own subscribe/unsubscribe do.
    ("chat/channels_redis_adapter.py", "import", "_wrap_close"): CHANNELS_REDIS,
    ("chat/channels_redis_adapter.py", "read", "_layers"): CHANNELS_REDIS,
    ("chat/channels_redis_adapter.py", "read", "_args"): CHANNELS_REDIS,
    ("chat/channels_redis_adapter.py", "read", "_kwargs"): CHANNELS_REDIS,
    ("chat/channels_redis_adapter.py", "override", "_get_layer"): CHANNELS_REDIS,
    ("chat/channels_redis_adapter.py", "read", "_get_layer"): CHANNELS_REDIS,
    ("chat/channels_redis_adapter.py", "read", "_get_shard"): CHANNELS_REDIS,
    ("chat/channels_redis_adapter.py", "write", "_shards"): CHANNELS_REDIS,
    ("chat/channels_redis_adapter.py", "read", "_lock"): CHANNELS_REDIS,
    ("chat/channels_redis_adapter.py", "read", "_subscribed_to"): CHANNELS_REDIS,
    ("chat/channels_redis_adapter.py", "read", "_ensure_redis"): CHANNELS_REDIS,
    ("chat/channels_redis_adapter.py", "read", "_ensure_receiver"): CHANNELS_REDIS,
    ("chat/channels_redis_adapter.py", "read", "_pubsub"): CHANNELS_REDIS,
    ("chat/channels_redis_adapter.py", "read", "_redis"): CHANNELS_REDIS,
    # Channels' own AuthMiddleware.resolve_scope fills the scope's UserLazyObject the
    # same way (channels==4.3.2, pinned); the subclass only loads the user elsewhere.
    ("chat/auth.py", "write", "_wrapped"): "as channels.auth.AuthMiddleware.resolve_scope "
                                           "does (channels pinned)",
    # Public attributes Django's admin documents for this ("AdminSite attributes":
    # site_header, site_title, index_title), set on the default site.
    ("chat/admin/__init__.py", "patch", "admin.site.site_header"): "documented AdminSite attribute",
    ("chat/admin/__init__.py", "patch", "admin.site.site_title"): "documented AdminSite attribute",
    ("chat/admin/__init__.py", "patch", "admin.site.index_title"): "documented AdminSite attribute",
}


def _files() -> list[Path]:
    return sorted(p for package in OURS for p in (ROOT / package).rglob("*.py"))


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _is_ours(module: str | None, level: int = 0) -> bool:
    return level > 0 or (module or "").split(".")[0] in OURS


@cache
def _trees() -> dict[Path, ast.Module]:
    return {path: ast.parse(path.read_text(), str(path)) for path in _files()}


def _classes(tree: ast.Module):
    """(class node, its enclosing class-name path) for every class of a module."""
    def walk(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef):
                yield child, (*prefix, child.name)
                yield from walk(child, (*prefix, child.name))
            elif not isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                yield from walk(child, prefix)
    yield from walk(tree, ())


@cache
def _class_object(module: str, qualname: tuple[str, ...]):
    obj = importlib.import_module(module)
    for name in qualname:
        obj = getattr(obj, name, None)
    return obj if inspect.isclass(obj) else None


@cache
def _defined_by(cls: type) -> frozenset[str]:
    """Names a class defines in its body or its methods use as attributes (the names
    of their code objects, nested ones included: ``self._x = ...`` among them)."""
    names = set(vars(cls))
    codes = [getattr(getattr(value, "__func__", value), "__code__", None)
             for value in vars(cls).values()]
    while codes:
        code = codes.pop()
        if code is not None:
            names.update(code.co_names)
            codes.extend(c for c in code.co_consts if inspect.iscode(c))
    return frozenset(names)


def _external_bases_define(cls: type | None, name: str) -> bool:
    if cls is None:
        return False
    return any(name in _defined_by(base) for base in cls.__mro__[1:]
               if base is not object and not _is_ours(base.__module__))


def _is_self(node: ast.expr) -> bool:
    return (isinstance(node, ast.Name) and node.id in ("self", "cls")) or (
        isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
        and node.func.id == "super")


def _enclosing_classes(tree: ast.Module) -> dict[ast.AST, tuple[str, ...]]:
    """Every node inside a class body (methods included), mapped to the class path."""
    owner = {}
    for class_node, qualname in _classes(tree):
        for node in ast.walk(class_node):
            owner[node] = qualname  # inner classes come later and overwrite
    return owner


def _accesses():
    """(file, kind, name, on_self, class object or None, line) of every private-looking
    attribute access, getattr-family call with a constant and private import."""
    for path, tree in _trees().items():
        rel = str(path.relative_to(ROOT))
        module = _module_name(path)
        owner = _enclosing_classes(tree)
        for node in ast.walk(tree):
            cls = _class_object(module, owner[node]) if node in owner else None
            if isinstance(node, ast.Attribute) and _is_private(node.attr):
                kind = "read" if isinstance(node.ctx, ast.Load) else "write"
                yield rel, kind, node.attr, _is_self(node.value), cls, node.lineno
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                  and node.func.id in ("getattr", "setattr", "hasattr", "delattr")
                  and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant)
                  and isinstance(node.args[1].value, str) and _is_private(node.args[1].value)):
                kind = "write" if node.func.id in ("setattr", "delattr") else "read"
                yield rel, kind, node.args[1].value, _is_self(node.args[0]), cls, node.lineno
            elif isinstance(node, ast.ImportFrom) and not _is_ours(node.module, node.level):
                for alias in node.names:
                    if _is_private(alias.name):
                        yield rel, "import", alias.name, False, None, node.lineno
            elif (isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
                  and _is_private(node.name) and node in owner):
                # A method of a class: it overrides a base class's private method when
                # that base (from another package) defines it.
                yield rel, "override", node.name, True, cls, node.lineno


def _our_names() -> set[str]:
    """Private names our code defines: functions, classes, class and module variables,
    and ``self._x = ...`` of our own classes (not an attribute a base class from
    another package has)."""
    names = set()
    for tree in _trees().values():
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                names.add(node.name)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
    for _, kind, name, on_self, cls, _ in _accesses():
        if kind in ("write", "override") and on_self and _external_bases_define(cls, name):
            names.discard(name)  # another package's, even where our code defines it too
    for _, kind, name, on_self, cls, _ in _accesses():
        if kind == "write" and on_self and not _external_bases_define(cls, name):
            names.add(name)
    return {name for name in names if _is_private(name)}


def _patches():
    """Assignments to an attribute of a module or class imported from another package."""
    for path, tree in _trees().items():
        rel = str(path.relative_to(ROOT))
        imported = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                imported |= {(a.asname or a.name).split(".")[0] for a in node.names
                             if not _is_ours(a.name)}
            elif isinstance(node, ast.ImportFrom) and not _is_ours(node.module, node.level):
                imported |= {a.asname or a.name for a in node.names}
        for node in ast.walk(tree):
            targets = (node.targets if isinstance(node, ast.Assign)
                       else [node.target] if isinstance(node, ast.AugAssign | ast.AnnAssign)
                       else [])
            for target in targets:
                root = target
                while isinstance(root, ast.Attribute):
                    root = root.value
                if (isinstance(target, ast.Attribute) and isinstance(root, ast.Name)
                        and root.id in imported):
                    yield rel, "patch", ast.unparse(target), node.lineno


def found() -> dict[tuple[str, str, str], list[int]]:
    """Every access to another package's private names, and every patch, by
    (file, kind, name), with its lines."""
    ours = _our_names()
    result: dict[tuple[str, str, str], list[int]] = {}
    for rel, kind, name, on_self, cls, line in _accesses():
        external = (_external_bases_define(cls, name) if on_self
                    else kind in ("import", "write") or name not in ours)
        if external:
            result.setdefault((rel, kind, name), []).append(line)
    for rel, kind, name, line in _patches():
        result.setdefault((rel, kind, name), []).append(line)
    return result


def test_every_use_of_another_packages_internals_is_listed_with_its_reason():
    new = {key: lines for key, lines in found().items() if key not in ALLOWED}
    assert not new, (
        "Private attributes of other packages (or patches of their modules/classes) "
        "used without an entry in tests/test_private_access.py ALLOWED: use a public "
        "API, or pin the library and list it with its reason:\n" + "\n".join(
            f"  {file}:{','.join(map(str, lines))}: {kind} {name}"
            for (file, kind, name), lines in sorted(new.items())))


def test_the_allow_list_names_only_accesses_that_still_exist():
    stale = sorted(set(ALLOWED) - set(found()))
    assert not stale, f"ALLOWED entries no longer found in the code (remove them): {stale}"


def test_a_private_write_on_a_library_object_is_found(tmp_path, monkeypatch):
    # The walk itself: the patterns this file exists for are reported.
    source = textwrap.dedent("""
        import httpx2
        from twisted.internet import tcp

        def install(transport, loop):
            transport._pool._network_backend = object()
            loop._selector = None
            setattr(loop, "_ready", [])
            tcp.Connection.write = print
    """)
    package = tmp_path / "chat"
    package.mkdir()
    (package / "patched.py").write_text(source)
    monkeypatch.setattr(f"{__name__}.ROOT", tmp_path)
    monkeypatch.setattr(f"{__name__}.OURS", ("chat",))
    _trees.cache_clear()
    try:
        keys = set(found())
    finally:
        _trees.cache_clear()
    assert {("chat/patched.py", "write", "_network_backend"),
            ("chat/patched.py", "read", "_pool"),
            ("chat/patched.py", "write", "_selector"),
            ("chat/patched.py", "write", "_ready"),
            ("chat/patched.py", "patch", "tcp.Connection.write")} <= keys
