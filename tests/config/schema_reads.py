"""Which config fields the code reads: an AST scan of megarl/ and launch/ (helper of test_schema_fields).

A field is identified by its section class and name (`OptimizerConfig.lr` covers `optimizer.lr`
and `critic.optimizer.lr`: both reach code as an OptimizerConfig). It counts as read where an
expression known to be that section has the attribute loaded: `cfg.rollout.n`, `r.n` after
`r = cfg.rollout`, `rollout.n` in a `from_config` whose parameter is named after the section
(`def from_config(cls, rollout)`) or a parameter annotated with the section class, `getattr(section, "n")` or `getattr(section, name)` with `name`
looping over literal strings; calling a method of the section (`reward.terms()`) reads what the
method reads. megarl/config/ is not scanned except resolve.py (derived defaults): it defines and
validates the fields (refusals are tested separately), so a field only checked there is not "read".
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import os
import textwrap
import typing

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCANNED = ("megarl", "launch")
NOT_SCANNED = (os.path.join("megarl", "config") + os.sep,)
SCANNED_ANYWAY = (os.path.join("megarl", "config", "resolve.py"),)


def sections(root) -> dict[str, type]:
    """{attribute name -> section class} for every section below `root` (e.g. "weight_sync" -> WeightSyncConfig)."""
    out: dict[str, type] = {}
    hints = typing.get_type_hints(root)
    for f in dataclasses.fields(root):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out[f.name] = tp
            out.update(sections(tp))
    return out


def leaf_fields(root, prefix: str = "") -> list[tuple[str, type, str]]:
    """[(dotted path, section class, field name)] of every non-section field below `root`."""
    out = []
    hints = typing.get_type_hints(root)
    for f in dataclasses.fields(root):
        path = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            out += leaf_fields(hints[f.name], path + ".")
        else:
            out.append((path, root, f.name))
    return out


class _Scope(ast.NodeVisitor):
    """Reads within one function (or module) body; nested functions get their own scope."""

    def __init__(self, root, section_names: dict[str, type], reads: set, aliases=None):
        self.root, self.section_names, self.reads = root, section_names, reads
        self.aliases: dict[str, type] = dict(aliases or {})
        self.loop_strings: dict[str, set[str]] = {}

    # -- what an expression is
    def section_of(self, node) -> type | None:
        if isinstance(node, ast.Name):
            if node.id in self.aliases:
                return self.aliases[node.id]
            return self.root if node.id == "cfg" else None
        if isinstance(node, ast.Attribute):
            if node.attr == "cfg":
                return self.root
            parent = self.section_of(node.value)
            if parent is not None:
                hint = typing.get_type_hints(parent).get(node.attr)
                return hint if dataclasses.is_dataclass(hint) else None
            return None
        if isinstance(node, ast.BoolOp):  # `o or cfg.optimizer`
            for value in node.values:
                found = self.section_of(value)
                if found is not None:
                    return found
        if isinstance(node, ast.IfExp):
            return self.section_of(node.body) or self.section_of(node.orelse)
        return None

    def bind(self, target, value) -> None:
        if isinstance(target, ast.Name):
            section = self.section_of(value)
            if section is not None:
                self.aliases[target.id] = section
        elif isinstance(target, ast.Tuple) and isinstance(value, ast.Tuple):
            for t, v in zip(target.elts, value.elts):
                self.bind(t, v)

    # -- visitors
    def visit_Assign(self, node):
        self.generic_visit(node)
        for target in node.targets:
            self.bind(target, node.value)

    def visit_For(self, node):
        if isinstance(node.iter, (ast.Tuple, ast.List)):
            strings = set()
            for elt in node.iter.elts:
                first = elt.elts[0] if isinstance(elt, ast.Tuple) and elt.elts else elt
                if isinstance(first, ast.Constant) and isinstance(first.value, str):
                    strings.add(first.value)
            target = node.target.elts[0] if isinstance(node.target, ast.Tuple) else node.target
            if isinstance(target, ast.Name):
                self.loop_strings[target.id] = strings
        self.generic_visit(node)


    def visit_Attribute(self, node):
        section = self.section_of(node.value)
        if section is not None and isinstance(node.ctx, ast.Load):  # setting a field is not reading it
            self.reads.add((section, node.attr))
        self.generic_visit(node)

    def visit_Call(self, node):
        if isinstance(node.func, ast.Name) and node.func.id == "getattr" and len(node.args) >= 2:
            section = self.section_of(node.args[0])
            name = node.args[1]
            if section is not None:
                if isinstance(name, ast.Constant) and isinstance(name.value, str):
                    self.reads.add((section, name.value))
                elif isinstance(name, ast.Name):
                    for value in self.loop_strings.get(name.id, ()):
                        self.reads.add((section, value))
        self.generic_visit(node)

    def visit_FunctionDef(self, node):
        aliases = dict(self.aliases)
        classes = {cls.__name__: cls for cls in self.section_names.values()}
        for arg in node.args.args + node.args.kwonlyargs:
            annotation = ast.unparse(arg.annotation) if arg.annotation is not None else ""
            if node.name == "from_config" and arg.arg in self.section_names:
                aliases[arg.arg] = self.section_names[arg.arg]  # from_config(cls, rollout): the section
            elif annotation in classes:
                aliases[arg.arg] = classes[annotation]
            elif "MegaRLConfig" in annotation:
                aliases[arg.arg] = self.root
        inner = _Scope(self.root, self.section_names, self.reads, aliases)
        for stmt in node.body:
            inner.visit(stmt)

    visit_AsyncFunctionDef = visit_FunctionDef


def python_files(repo: str = REPO):
    for top in SCANNED:
        for folder, _, files in os.walk(os.path.join(repo, top)):
            for name in sorted(files):
                path = os.path.join(folder, name)
                rel = os.path.relpath(path, repo)
                if name.endswith(".py") and (not rel.startswith(NOT_SCANNED) or rel in SCANNED_ANYWAY):
                    yield path


def config_reads(root, sources: dict[str, str] | None = None) -> set[tuple[type, str]]:
    """{(section class, field name)} read by the scanned code (or by `sources`: {name: text})."""
    if sources is None:
        sources = {}
        for path in python_files():
            with open(path) as f:
                sources[path] = f.read()
    reads: set[tuple[type, str]] = set()
    names = sections(root)
    for path, text in sources.items():
        _Scope(root, names, reads).visit(ast.parse(text, filename=path))
    for section, method in list(reads):
        member = getattr(section, method, None)
        member = member.fget if isinstance(member, property) else member
        if callable(member) and not isinstance(member, type):
            for node in ast.walk(ast.parse(textwrap.dedent(inspect.getsource(member)))):
                if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self":
                    reads.add((section, node.attr))
    return reads


def unread_fields(root, reads, allowed: set[str] = frozenset()) -> list[str]:
    """Dotted paths of leaf fields neither in `reads` nor in `allowed`."""
    return [path for path, section, name in leaf_fields(root) if (section, name) not in reads and path not in allowed]
