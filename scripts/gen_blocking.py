#!/usr/bin/env python3
"""Write ``asyncstage/blocking.py``, the typed blocking surface, from the async classes.

    python scripts/gen_blocking.py          # regenerate after changing an async class
    python scripts/gen_blocking.py --check  # exit 1 when the committed file is stale

Like httpcore's ``scripts/unasync.py`` and psycopg's ``tools/async_to_sync.py`` the sync
code is generated, but here it stays a thin facade: every generated method runs the async
method of the same name on the one event loop of :mod:`asyncstage._blocking_runtime`.

For each public member of the async ``Manager``, ``Server``, ``Volume`` and ``LocalCloud``
(methods, properties, and the public attributes their ``__init__`` sets) the generator
reads the source with :mod:`ast` and writes a method or property with the same parameters
and defaults; a property keeps its docstring, a method gets the async method's docstring
when the module is imported (``_register``; ``scripts/griffe_blocking.py`` does the same
for the docs). In annotations the async classes become their blocking twins (except inside
``type[...]``: a class, not an instance); results that hold async objects are wrapped into
twins. ``<Name>Options`` is the keyword arguments of ``<Name>.__init__`` (a TypedDict that
``**kwargs: Unpack[...]`` names is its base, not copied).
What cannot be derived (a Manager's and a LocalCloud's lifetime, the file objects of
``scmd_read`` / ``scmd_write``) is written by hand in the runtime module, in the bases of
the generated classes: whatever a base defines is not generated. Members that have no
twin on purpose are listed in ``_blocking_runtime.NOT_TWINNED``.
"""

from __future__ import annotations

import argparse
import ast
import builtins
import copy
import difflib
import importlib
import inspect
import re
import subprocess
import sys
import textwrap
import types
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from asyncstage import _blocking_runtime as runtime  # noqa: E402

OUTPUT = ROOT / "asyncstage" / "blocking.py"
"""Where the surface is written (and read by ``--check``)."""


@dataclass(frozen=True)
class Target:
    """One blocking class: its async twin, the hand-written base, its docstring."""

    name: str
    async_path: str  # module:qualname of the async class
    public: str  # the documented name of the async class
    base: str  # the base class in asyncstage._blocking_runtime
    doc: str
    constructor: str | None = None  # None: made from async objects only; "options": TypedDict
    settable: tuple[str, ...] = ()  # plain attributes that get a setter


TARGETS = [
    Target(
        "Manager",
        "asyncstage.manager:Manager",
        "asyncstage.Manager",
        "_ManagerLifetime",
        """Blocking twin of :class:`asyncstage.Manager`; opened by the constructor.

    ``with blocking.Manager(region="eu-west-1") as m: s = m.get_server("a")``. Leaving the
    block, :meth:`close`, or the end of the program applies ``on_exit`` to the servers it
    started.""",
        constructor="options",
        settable=("on_exit",),
    ),
    Target(
        "Server",
        "asyncstage.server:Server",
        "asyncstage.Server",
        "_ServerStreams",
        """Blocking twin of :class:`asyncstage.Server` (``str(server)`` is its instance id).""",
    ),
    Target(
        "Volume",
        "asyncstage.volume:Volume",
        "asyncstage.Volume",
        "_Twinned[_AsyncVolume]",
        """Blocking twin of :class:`asyncstage.Volume` (``str(volume)`` is its volume id).""",
    ),
    Target(
        "LocalCloud",
        "asyncstage.localcloud:LocalCloud",
        "asyncstage.localcloud.LocalCloud",
        "_LocalCloudLifetime",
        """Blocking twin of :class:`asyncstage.localcloud.LocalCloud`; started by the constructor.

    ``with blocking.LocalCloud() as cloud, cloud.manager() as m: ...``. Needs root.""",
        constructor="options",
    ),
]

OPERATORS = ("__truediv__", "__fspath__")
"""Dunder methods that are public API (the rest belong to the object model)."""

ATTRIBUTE_TYPES = {
    "Manager.image_owners": "list[str] | None",
    "Manager.ssh_cidrs": "list[str]",
}
"""Types of public attributes that the async source neither annotates nor lets the generator
infer (``self.x = f(y) if y else [z]``); annotating them there makes the entry unnecessary."""

_ITERABLES = {"Iterable", "Sequence", "Collection", "Iterator", "AbstractSet", "Set"}
_ASYNC_ONLY = {"AbstractAsyncContextManager", "AsyncIterator", "AsyncIterable", "AsyncGenerator"}


class GenError(Exception):
    """The async API has something the generator cannot translate."""


def load(path: str) -> Any:
    module, _, qualname = path.partition(":")
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


TWINS: dict[type[Any], str] = {load(t.async_path): t.name for t in TARGETS}
PROTOCOL_TWINS = {
    "asyncstage.context:ManagerRef": "Manager",
    "asyncstage.refs:ServerRef": "Server",
    "asyncstage.refs:VolumeRef": "Volume",
}
"""Protocols by which a handle names another (imports flow one way); at run time it is
always the handle itself, so its twin is the handle's."""
TWINS |= {load(path): name for path, name in PROTOCOL_TWINS.items()}


# -- names: what a name in an async module refers to --------------------------------------


@dataclass(frozen=True)
class Ref:
    """``from module import attr`` (attr None: ``import module``)."""

    module: str
    attr: str | None


_module_names: dict[str, dict[str, Ref]] = {}


def module_names(modname: str) -> dict[str, Ref]:
    """The names a module defines or imports at its top level (TYPE_CHECKING ones too)."""
    if modname in _module_names:
        return _module_names[modname]
    tree = ast.parse(inspect.getsource(importlib.import_module(modname)))
    names: dict[str, Ref] = {}
    package = modname if _is_package(modname) else modname.rpartition(".")[0]

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.Import):
                for a in node.names:
                    names[a.asname or a.name.split(".")[0]] = Ref(
                        a.name if a.asname else a.name.split(".")[0], None
                    )
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    parts = parts[: len(parts) - node.level + 1]
                    base = ".".join([*parts, *([node.module] if node.module else [])])
                for a in node.names:
                    names[a.asname or a.name] = Ref(base, a.name)
            elif isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                names[node.name] = Ref(modname, node.name)
            elif isinstance(node, ast.Assign | ast.AnnAssign):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for t in targets:
                    if isinstance(t, ast.Name):
                        names[t.id] = Ref(modname, t.id)
            elif isinstance(node, ast.If | ast.Try):
                visit(node.body)
                visit(getattr(node, "orelse", []))

    visit(tree.body)
    _module_names[modname] = names
    return names


def _is_package(modname: str) -> bool:
    return hasattr(importlib.import_module(modname), "__path__")


def ref_object(ref: Ref) -> Any:
    """The object a Ref names (a module, a class, an alias ...)."""
    if ref.attr is None:
        return importlib.import_module(ref.module)
    module = importlib.import_module(ref.module)
    if hasattr(module, ref.attr):
        return getattr(module, ref.attr)
    return importlib.import_module(f"{ref.module}.{ref.attr}")


def resolve(name: str, modname: str) -> Ref | None:
    """What ``name`` means in module ``modname``; None for a builtin."""
    ref = module_names(modname).get(name)
    if ref is None and not hasattr(builtins, name):
        raise GenError(f"{modname}: cannot tell what {name!r} is")
    return ref


# -- annotations: rewritten for the blocking module ---------------------------------------


@dataclass
class Imports:
    """The imports the generated module needs, each under one local name."""

    typing_only: dict[Ref, str] = field(default_factory=dict)
    runtime: dict[Ref, str] = field(default_factory=dict)
    taken: set[str] = field(default_factory=set)

    def local(self, ref: Ref, name: str, *, at_runtime: bool = False) -> str:
        """The local name of ``ref`` (``name`` unless another import took it)."""
        if ref in self.runtime:
            return self.runtime[ref]
        if ref in self.typing_only:
            if at_runtime:
                self.runtime[ref] = self.typing_only.pop(ref)
                return self.runtime[ref]
            return self.typing_only[ref]
        local = name
        if local in self.taken:
            local = f"_{ref.module.rpartition('.')[2]}_{ref.attr or name}"
        self.taken.add(local)
        (self.runtime if at_runtime else self.typing_only)[ref] = local
        return local

    def lines(self, table: dict[Ref, str], indent: str = "") -> Iterator[str]:
        for ref, local in sorted(table.items(), key=lambda kv: (kv[0].module, kv[0].attr or "")):
            if ref.attr is None:
                alias = "" if local == ref.module else f" as {local}"
                yield f"{indent}import {ref.module}{alias}"
            else:
                alias = "" if local == ref.attr else f" as {local}"
                yield f"{indent}from {ref.module} import {ref.attr}{alias}"


class Rewriter(ast.NodeTransformer):
    """Rewrites an annotation of module ``modname`` for the blocking module: names are
    imported, async classes become blocking ones (``twins=True``) or ``_AsyncX``."""

    def __init__(self, imports: Imports, modname: str, *, twins: bool, at_runtime: bool) -> None:
        self.imports, self.modname = imports, modname
        self.twins, self.at_runtime = twins, at_runtime
        self.found_twin = False
        self.found_iterable_twin = False
        self._in_type = 0
        self._in_iterable = 0

    def rewrite(self, node: ast.expr) -> str:
        return ast.unparse(self.fresh(node))

    def fresh(self, node: ast.expr) -> ast.expr:
        """The rewritten copy of ``node`` (the parsed sources are cached: left as they are)."""
        rewritten: ast.expr = self.visit(copy.deepcopy(node))
        return rewritten

    def _twin_name(self, obj: Any) -> str | None:
        if not isinstance(obj, type) or obj not in TWINS:
            return None
        if self.twins and not self._in_type:
            self.found_twin = True
            self.found_iterable_twin |= bool(self._in_iterable)
            return TWINS[obj]
        return f"_Async{TWINS[obj]}"

    def visit_Constant(self, node: ast.Constant) -> ast.AST:
        if isinstance(node.value, str) and not self.at_runtime:  # a quoted annotation
            rewritten: ast.AST = self.visit(ast.parse(node.value, mode="eval").body)
            return rewritten
        return node

    def visit_Name(self, node: ast.Name) -> ast.AST:
        ref = resolve(node.id, self.modname)
        if ref is None:
            return node
        twin = self._twin_name(ref_object(ref))
        if twin is not None:
            return ast.Name(twin, ast.Load())
        return ast.Name(self.imports.local(ref, node.id, at_runtime=self.at_runtime), ast.Load())

    def visit_Attribute(self, node: ast.Attribute) -> ast.AST:
        twin = self._twin_name(_dotted_object(node, self.modname))
        if twin is not None:
            return ast.Name(twin, ast.Load())
        return self.generic_visit(node)

    def visit_Subscript(self, node: ast.Subscript) -> ast.AST:
        head = node.value.id if isinstance(node.value, ast.Name) else ""
        if head == "Literal":  # its strings are values, not quoted annotations
            node.value = self.visit(node.value)
            return node
        if head in _ASYNC_ONLY:
            raise GenError(f"{self.modname}: {ast.unparse(node)} has no blocking form")
        in_type, in_iter = head == "type", head in _ITERABLES
        self._in_type += in_type
        self._in_iterable += in_iter
        try:
            return self.generic_visit(node)
        finally:
            self._in_type -= in_type
            self._in_iterable -= in_iter


def _dotted_object(node: ast.expr, modname: str) -> Any:
    """The object ``a.b.c`` names in module ``modname`` (None when it is not a plain name)."""
    if isinstance(node, ast.Name):
        ref = resolve(node.id, modname)
        return None if ref is None else ref_object(ref)
    if isinstance(node, ast.Attribute):
        return getattr(_dotted_object(node.value, modname), node.attr, None)
    return None


# -- the async source --------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """The parsed source of one function or class, with its text for docstrings."""

    text: str
    node: Any  # ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef
    modname: str


_sources: dict[Any, Source] = {}


def source(obj: Any) -> Source:
    if obj not in _sources:
        text = textwrap.dedent(inspect.getsource(obj))
        _sources[obj] = Source(text, ast.parse(text).body[0], obj.__module__)
    return _sources[obj]


def docstring(text: str, node: ast.stmt | None, indent: str) -> str | None:
    """The docstring ``node`` (an ``Expr`` of a string) as written, re-indented."""
    if not (
        isinstance(node, ast.Expr)
        and isinstance(node.value, ast.Constant)
        and isinstance(node.value.value, str)
    ):
        return None
    segment = ast.get_source_segment(text, node) or ""
    first, *rest = segment.splitlines()
    lines = [first] + [indent + line[node.col_offset :] if line.strip() else "" for line in rest]
    return indent + "\n".join(lines)


# -- the types of attributes ----------------------------------------------------------------


@dataclass(frozen=True)
class Typ:
    """One member of a union type: an annotation node in module ``modname``."""

    node: ast.expr
    modname: str
    cls: type[Any] | None = None  # the class it names, when it names one


def union_parts(node: ast.expr, modname: str) -> list[Typ]:
    """``A | B | None`` → [A, B, None]; a simple name of a class keeps the class."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return union_parts(ast.parse(node.value, mode="eval").body, modname)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        return union_parts(node.left, modname) + union_parts(node.right, modname)
    obj = _dotted_object(node, modname)
    return [Typ(node, modname, obj if isinstance(obj, type) else None)]


def _is_none(t: Typ) -> bool:
    return isinstance(t.node, ast.Constant) and t.node.value is None


def _init_assignments(cls: type[Any]) -> Iterator[tuple[str, ast.stmt, ast.stmt | None]]:
    """``(name, assignment, next statement)`` for each ``self.name = ...`` in ``__init__``
    (also inside ``if``, ``with`` and ``try`` blocks), in source order."""
    init = vars(cls).get("__init__")
    if inspect.isfunction(init):
        yield from _assignments(source(init).node.body)


def _assignments(body: list[ast.stmt]) -> Iterator[tuple[str, ast.stmt, ast.stmt | None]]:
    for i, stmt in enumerate(body):
        target: ast.expr | None = stmt.target if isinstance(stmt, ast.AnnAssign) else None
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1:
            target = stmt.targets[0]
        if (
            isinstance(target, ast.Attribute)
            and isinstance(target.value, ast.Name)
            and target.value.id == "self"
        ):
            yield target.attr, stmt, body[i + 1] if i + 1 < len(body) else None
        for block in ("body", "orelse", "finalbody"):
            if isinstance(stmt, ast.If | ast.With | ast.Try):
                yield from _assignments(getattr(stmt, block, []))
        for handler in getattr(stmt, "handlers", []):
            yield from _assignments(handler.body)


def attr_type(cls: type[Any], name: str) -> list[Typ]:
    """The type of attribute ``name`` of ``cls``: a property's, an annotation's, or what
    ``__init__`` assigns to it."""
    for klass in cls.__mro__[:-1]:
        member = vars(klass).get(name)
        if isinstance(member, property) and member.fget is not None:
            fget = source(member.fget)
            if fget.node.returns is None:
                raise GenError(f"{klass.__name__}.{name}: the property has no return type")
            return union_parts(fget.node.returns, fget.modname)
        for stmt in source(klass).node.body:
            if isinstance(stmt, ast.AnnAssign) and ast.unparse(stmt.target) == name:
                return union_parts(stmt.annotation, klass.__module__)
        assigned = [stmt for attr, stmt, _ in _init_assignments(klass) if attr == name]
        for stmt in assigned:
            if isinstance(stmt, ast.AnnAssign):
                return union_parts(stmt.annotation, klass.__module__)
        values = [stmt.value for stmt in assigned if isinstance(stmt, ast.Assign)]
        if values:  # every value it may get
            return [t for value in values for t in infer(value, klass)]
    raise GenError(f"{cls.__name__}.{name}: not found")


def infer(expr: ast.expr, cls: type[Any]) -> list[Typ]:
    """The type of an expression in ``cls.__init__`` (the simple cases, else GenError)."""
    modname = cls.__module__
    init = source(vars(cls)["__init__"]).node
    where = f"{cls.__name__}.__init__: {ast.unparse(expr)}"
    if isinstance(expr, ast.Constant):
        if expr.value is None:
            return [Typ(expr, modname)]
        return [Typ(ast.Name(type(expr.value).__name__), modname)]
    if isinstance(expr, ast.Name):
        for arg in [*init.args.posonlyargs, *init.args.args, *init.args.kwonlyargs]:
            if arg.arg == expr.id:
                if arg.annotation is None:
                    raise GenError(f"{where}: the parameter has no annotation")
                return union_parts(arg.annotation, modname)
        value = _dotted_object(expr, modname)
        if isinstance(value, str | int | float | bool | bytes):
            return [Typ(ast.Name(type(value).__name__), modname)]
    if isinstance(expr, ast.Call):
        func = _dotted_object(expr.func, modname)
        if isinstance(func, type) and func.__module__ != "builtins":
            return [Typ(ast.Name(func.__name__), func.__module__, func)]
        if func in (str, int, float, bool, bytes):
            return [Typ(ast.Name(func.__name__), modname)]
        if inspect.isfunction(func) and source(func).node.returns is not None:
            return union_parts(source(func).node.returns, func.__module__)
    if isinstance(expr, ast.Attribute):
        if isinstance(expr.value, ast.Name) and expr.value.id == "self":
            return attr_type(cls, expr.attr)
        owner = infer(expr.value, cls)
        if len(owner) == 1 and owner[0].cls is not None:
            return attr_type(owner[0].cls, expr.attr)
    if isinstance(expr, ast.BoolOp) and isinstance(expr.op, ast.Or):
        *firsts, last = [infer(v, cls) for v in expr.values]
        return [t for ts in firsts for t in ts if not _is_none(t)] + last
    if isinstance(expr, ast.IfExp):
        return infer(expr.body, cls) + infer(expr.orelse, cls)
    raise GenError(f"{where}: cannot infer the type; annotate it, or see ATTRIBUTE_TYPES")


# -- writing the blocking classes ---------------------------------------------------------

IND = "    "


@dataclass
class Writer:
    """Writes one blocking class; ``imports`` is shared by the whole module."""

    target: Target
    imports: Imports
    cls: type[Any] = field(init=False)
    base: type[Any] = field(init=False)

    def __post_init__(self) -> None:
        self.cls = load(self.target.async_path)
        self.base = getattr(runtime, self.target.base.partition("[")[0])

    def annotation(self, parts: list[Typ]) -> tuple[str, Rewriter]:
        """``parts`` as one annotation of the blocking module, and what the rewrite met."""
        texts: list[str] = []
        rewriter = Rewriter(self.imports, "", twins=True, at_runtime=False)
        for part in parts:
            rewriter.modname = part.modname
            text = rewriter.rewrite(part.node)
            if text not in texts:
                texts.append(text)
        return " | ".join(texts), rewriter

    def fallback_doc(self, name: str, kind: str) -> str:
        return f'{IND * 2}"""Same as :{kind}:`{self.target.public}.{name}`."""'

    def members(self) -> Iterator[tuple[str, Any]]:
        """The public members to twin, in source order: ``__init__``'s attributes first."""
        skip = runtime.NOT_TWINNED.get(self.target.name, {})
        seen: set[str] = set()

        def wanted(name: str) -> bool:
            public = not name.startswith("_") or name in OPERATORS
            hand_written = any(name in vars(k) for k in self.base.__mro__[:-1])
            return public and name not in skip and name not in seen and not hand_written

        for klass in reversed(self.cls.__mro__[:-1]):
            for name, _, after in _init_assignments(klass):
                if wanted(name):
                    seen.add(name)
                    yield name, (klass, after)
        for klass in self.cls.__mro__[:-1]:
            for name, member in vars(klass).items():
                other = isinstance(member, property | classmethod | staticmethod)
                if wanted(name) and (callable(member) or other):
                    seen.add(name)
                    yield name, member

    def write(self) -> Iterator[str]:
        """Two classes: ``_<Name>Attributes`` (attributes and properties, on the hand-written
        base) and ``<Name>`` (constructor and methods), each a readable size."""
        t = self.target
        data: list[str] = []
        methods: list[str] = [*self.constructor()] if t.constructor else []
        first: dict[int, str] = {}  # id of a function or property → its first name
        for name, member in self.members():
            into = methods if inspect.isfunction(member) else data
            if not isinstance(member, tuple) and id(member) in first:
                into.append(f"\n{IND}{name} = {first[id(member)]}")  # an alias, as in async
                continue
            first.setdefault(id(member), name)
            if isinstance(member, tuple):
                data += self.attribute(name, *member)
            elif isinstance(member, property):
                data += self.prop(name, member)
            elif inspect.isfunction(member):
                methods += self.method(name, member)
            else:
                raise GenError(f"{t.name}.{name}: a {type(member).__name__}, not a method")
        yield f"class _{t.name}Attributes({t.base}):"
        yield f'{IND}"""The attributes and properties of :class:`{t.name}`."""'
        yield from data
        yield f"\n\nclass {t.name}(_{t.name}Attributes):"
        yield f'{IND}"""{t.doc}\n{IND}"""'
        yield from methods

    def attribute(self, name: str, klass: type[Any], after: ast.stmt | None) -> Iterator[str]:
        key = f"{self.target.name}.{name}"
        if key in ATTRIBUTE_TYPES:
            text = ATTRIBUTE_TYPES[key]  # in the terms of the async class's module
            parts = union_parts(ast.parse(text, mode="eval").body, self.cls.__module__)
        else:
            parts = attr_type(self.cls, name)
        doc = docstring(source(vars(klass)["__init__"]).text, after, IND * 2)
        yield from self.getter(name, parts, doc or self.fallback_doc(name, "attr"))
        if name in self.target.settable:
            yield from self.setter(name, parts)

    def prop(self, name: str, member: property) -> Iterator[str]:
        fget = source(member.fget)
        parts = union_parts(fget.node.returns, fget.modname)
        doc = docstring(fget.text, fget.node.body[0], IND * 2)
        yield from self.getter(name, parts, doc or self.fallback_doc(name, "attr"))
        if member.fset is not None or name in self.target.settable:
            yield from self.setter(name, parts)

    def getter(self, name: str, parts: list[Typ], doc: str) -> Iterator[str]:
        ann, rewriter = self.annotation(parts)
        value = f"self._async.{name}"
        if rewriter.found_twin:
            value = f"cast({ann!r}, _wrap({value}))"
        yield f"\n{IND}@property\n{IND}def {name}(self) -> {ann}:\n{doc}\n{IND * 2}return {value}"

    def setter(self, name: str, parts: list[Typ]) -> Iterator[str]:
        ann, rewriter = self.annotation(parts)
        value = "_unwrap(value)" if rewriter.found_twin else "value"
        yield (
            f"\n{IND}@{name}.setter\n{IND}def {name}(self, value: {ann}) -> None:\n"
            f"{IND * 2}self._async.{name} = {value}"
        )

    def method(self, name: str, func: types.FunctionType) -> Iterator[str]:
        src = source(func)
        node = src.node
        args: ast.arguments = node.args
        positional = [*args.posonlyargs, *args.args]
        if not positional or positional[0].arg != "self":
            raise GenError(f"{self.target.name}.{name}: not an instance method")
        if node.returns is None:
            raise GenError(f"{self.target.name}.{name}: no return type")
        sig, listed = self.signature(args, src.modname)
        passed = [f"list({a.arg})" if a.arg in listed else a.arg for a in positional[1:]]
        if args.vararg:
            passed.append(f"*{args.vararg.arg}")
        passed += [f"{a.arg}={a.arg}" for a in args.kwonlyargs]
        if args.kwarg:
            passed.append(f"**{args.kwarg.arg}")
        ret, rewriter = self.annotation(union_parts(node.returns, src.modname))
        runner = "_call_async" if inspect.iscoroutinefunction(func) else "_call_sync"
        value = f"{runner}({', '.join([f'self._async.{name}', *passed])})"
        if ret == "None":
            statement = value
        elif rewriter.found_twin:
            statement = f"return cast({ret!r}, _wrap({value}))"
        else:
            statement = f"return {value}"
        if docstring(src.text, node.body[0], "") is None:
            raise GenError(f"{self.target.name}.{name}: no docstring to share")
        # no docstring here: _register gives it the async method's (one text, one home)
        yield f"\n{IND}def {name}({sig}) -> {ret}:\n{IND * 2}{statement}"

    def signature(self, args: ast.arguments, modname: str) -> tuple[str, set[str]]:
        """The parameters rewritten for the blocking module, and those that take an
        iterable of twins (passed on as a list: the loop's thread unwraps lists)."""
        args = ast.arguments(**{f: getattr(args, f) for f in args._fields})
        listed: set[str] = set()
        rewritten: dict[int, ast.arg] = {}
        for a in [*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg]:
            if a is None or a.annotation is None:
                continue
            ann, rewriter = self.annotation(union_parts(a.annotation, modname))
            if rewriter.found_iterable_twin:
                listed.add(a.arg)
            rewritten[id(a)] = ast.arg(a.arg, ast.parse(ann, mode="eval").body)

        def arg(a: ast.arg) -> ast.arg:
            return rewritten.get(id(a), a)

        defaults = Rewriter(self.imports, modname, twins=False, at_runtime=True)
        new = ast.arguments(
            posonlyargs=[arg(a) for a in args.posonlyargs],
            args=[arg(a) for a in args.args],
            vararg=args.vararg and arg(args.vararg),
            kwonlyargs=[arg(a) for a in args.kwonlyargs],
            kw_defaults=[d and defaults.fresh(d) for d in args.kw_defaults],
            kwarg=args.kwarg and arg(args.kwarg),
            defaults=[defaults.fresh(d) for d in args.defaults],
        )
        return ast.unparse(new), listed

    def constructor(self) -> Iterator[str]:
        name = self.target.name
        yield (
            f"\n{IND}def __init__(self, **options: Unpack[{name}Options]) -> None:\n"
            f'{IND * 2}"""Make the async {name} with these arguments (see the class)."""\n'
            f"{IND * 2}self._adopt(call(_Async{name}, **options))"
        )

    def options(self) -> Iterator[str]:
        """``<Name>Options``: the keyword arguments of the async class's ``__init__`` (those
        of a ``**kwargs: Unpack[SomeTypedDict]`` included)."""
        t = self.target
        init = source(vars(self.cls)["__init__"])
        args = init.node.args
        if args.args[1:] or args.posonlyargs or args.vararg:
            raise GenError(f"{t.name}.__init__: only keyword-only parameters are handled")
        base = "TypedDict"
        if args.kwarg:  # its keys are the TypedDict's: inherited, not copied
            base = self.unpacked(args.kwarg, init.modname, f"{t.name}.__init__")
        yield f"class {t.name}Options({base}, total=False):"
        yield f'{IND}"""The keyword arguments of :class:`{t.public}` (generated from them)."""\n'
        for a in args.kwonlyargs:
            if a.annotation is None:
                raise GenError(f"{t.name}.__init__: {a.arg} has no annotation")
            rewriter = Rewriter(self.imports, init.modname, twins=False, at_runtime=False)
            yield f"{IND}{a.arg}: {rewriter.rewrite(a.annotation)}"

    def unpacked(self, kwarg: ast.arg, modname: str, where: str) -> str:
        """The local name of the TypedDict of ``**kwarg: Unpack[SomeTypedDict]``, imported."""
        note = kwarg.annotation
        if not (
            isinstance(note, ast.Subscript)
            and isinstance(note.value, ast.Name)
            and note.value.id == "Unpack"
            and isinstance(note.slice, ast.Name)
        ):
            raise GenError(f"{where}: **{kwarg.arg} must be annotated Unpack[SomeTypedDict]")
        ref = resolve(note.slice.id, modname)
        if ref is None:
            raise GenError(f"{where}: cannot find {note.slice.id}")
        return self.imports.local(ref, note.slice.id, at_runtime=True)


# -- the module ----------------------------------------------------------------------------

HEADER = '''"""The blocking facade: the async API without ``async``, for scripts and shells.

::

    from asyncstage import blocking

    with blocking.LocalCloud() as cloud, cloud.manager() as m:
        s = m.get_server("a")
        print(s.scmd("whoami"))
        with s.scmd_read("ls -l /etc") as f:
            for line in f:
                print(line, end="")

``Manager``, ``Server``, ``Volume`` and ``LocalCloud`` have the names, arguments and
documentation of their async twins (:class:`asyncstage.Manager` ...); each call runs the
async method on one background event loop and blocks until it is done. Servers and volumes
that come back are their blocking twins (the same twin for the same object), and blocking
objects may be passed wherever the async API takes them. Calls may come from several
threads at once. A ``Manager`` is opened by its constructor and a ``LocalCloud`` started by
its; whatever is still open when the interpreter exits is closed then (managers first).
Ctrl-C during a call cancels the call. See docs/blocking.md.
"""

# GENERATED by scripts/gen_blocking.py from the async classes: do not edit.
# Regenerate with `python scripts/gen_blocking.py`; the runtime is asyncstage/_blocking_runtime.py.
'''

EXPORTS = ["CommandReader", "CommandWriter", "LocalCloud", "LocalCloudOptions", "Manager"]
EXPORTS += ["ManagerOptions"]
EXPORTS += ["Server", "Volume", "call"]
REEXPORTS = ["NOT_TWINNED", "_Twin", "_Twinned", "_plain", "_twin"]
"""Runtime names that tests and subclasses reach through ``asyncstage.blocking``."""
RUNTIME = ["CommandReader", "CommandWriter", "call", "_call_async", "_call_sync", "_register"]
RUNTIME += ["_unwrap", "_wrap"]


def generate() -> str:
    imports = Imports()
    imports.taken.update(t.name for t in TARGETS)
    imports.taken.update(f"{t.name}Options" for t in TARGETS if t.constructor == "options")
    imports.taken.update(REEXPORTS)
    for name in ("TYPE_CHECKING", "TypedDict", "Unpack", "cast"):
        imports.local(Ref("typing", name), name, at_runtime=True)
    bases = {t.base.partition("[")[0] for t in TARGETS} - set(REEXPORTS)
    imports.taken.update(RUNTIME + sorted(bases))
    for t in TARGETS:
        module, _, qualname = t.async_path.partition(":")
        imports.local(Ref(module, qualname), f"_Async{t.name}", at_runtime=True)
    body: list[str] = []
    for t in TARGETS:
        writer = Writer(t, imports)
        if t.constructor == "options":
            body += [*writer.options(), "\n"]
        body += [*writer.write(), "\n"]
    body += [f"_register(_Async{t.name}, {t.name})" for t in TARGETS]
    for name in RUNTIME + sorted(bases):
        if name in EXPORTS or re.search(rf"\b{name}\b", "".join(body)):
            imports.runtime[Ref(runtime.__name__, name)] = name
    head = [HEADER, "from __future__ import annotations\n"]
    head += [f"from {runtime.__name__} import {n} as {n}" for n in REEXPORTS]
    head += [*imports.lines(imports.runtime), "", "if TYPE_CHECKING:"]
    head += [*imports.lines(imports.typing_only, IND), ""]
    head += [f"__all__ = {sorted(EXPORTS)!r}\n"]
    return format_code("\n".join(head + body) + "\n")


def format_code(code: str) -> str:
    """Sort the imports and format as ``ruff format`` would (the project's settings)."""
    for command in (["check", "--fix", "--quiet", "--select", "I"], ["format"]):
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "ruff",
                *command,
                "--stdin-filename",
                "asyncstage/blocking.py",
                "-",
            ],
            input=code,
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        if done.returncode != 0:
            raise GenError(f"ruff {command[0]} failed: {done.stderr}\n{code}")
        code = done.stdout
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the committed file differs")
    args = parser.parse_args(argv)
    try:
        code = generate()
    except GenError as e:
        print(f"gen_blocking: {e}", file=sys.stderr)
        return 2
    rel = OUTPUT.relative_to(ROOT) if OUTPUT.is_relative_to(ROOT) else OUTPUT
    old = OUTPUT.read_text() if OUTPUT.exists() else ""
    if args.check:
        if old == code:
            return 0
        diff = difflib.unified_diff(
            old.splitlines(keepends=True), code.splitlines(keepends=True), str(rel), "generated"
        )
        sys.stderr.writelines(diff)
        print(f"{rel} is stale: run python scripts/gen_blocking.py", file=sys.stderr)
        return 1
    if old != code:
        OUTPUT.write_text(code)
        print(f"wrote {rel}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
