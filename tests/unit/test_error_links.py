"""Every error and warning the package raises or logs ends with ``see("<anchor>")``, a pointer to
its entry in docs/troubleshooting.md, and every such anchor exists (GitHub's anchor rules, the
slug function of ``test_docs_links.py``)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from adascale_shard._docs import see
from tests.unit.test_docs_links import anchors

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "adascale_shard"
TROUBLESHOOTING = ROOT / "docs" / "troubleshooting.md"
SEE = re.compile(r'\bsee\("([^"]*)"\)')
LOG_METHODS = {"warning", "error", "critical", "exception"}
MIN_SITES = 70  # about 85 today: the test must not pass on an empty list


def _is_message(node: ast.expr) -> bool:
    """A string literal, an f-string, or a concatenation of them (``"..." + see("...")``)."""
    if isinstance(node, ast.Constant):
        return isinstance(node.value, str)
    if isinstance(node, ast.JoinedStr):
        return True
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return _is_message(node.left) or _is_message(node.right)
    return False


def _module_strings(tree: ast.Module) -> dict[str, ast.expr]:
    """Module-level ``NAME = <message>`` assignments (messages kept in a constant)."""
    out = {}
    for stmt in tree.body:
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
            if _is_message(stmt.value):
                out[stmt.targets[0].id] = stmt.value
    return out


def message_sites() -> list[tuple[str, int, str]]:
    """``(file, line, source)`` of each ``raise <Name>(<message>, ...)`` and each ``logger.warning(...)``
    (``error``, ``critical``, ``exception`` too) in the package, and each message returned by a
    ``*_message`` method; a ``raise <Name>(CONSTANT)`` (or ``return CONSTANT``) is checked at the
    constant's assignment."""
    sites = []
    for path in sorted(PACKAGE.rglob("*.py")):
        src = path.read_text(encoding="utf-8")
        tree = ast.parse(src)
        constants = _module_strings(tree)
        rel = str(path.relative_to(ROOT))
        for node in ast.walk(tree):
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
                call = node.exc
                if not isinstance(call.func, (ast.Name, ast.Attribute)) or not call.args:
                    continue
                first = call.args[0]
                if _is_message(first):
                    sites.append((rel, node.lineno, ast.get_source_segment(src, call)))
                elif isinstance(first, ast.Name) and first.id in constants:
                    sites.append((rel, node.lineno, ast.get_source_segment(src, constants[first.id])))
            elif isinstance(node, ast.FunctionDef) and node.name.endswith("_message"):
                # a message built by a helper method (the engines' _unrecorded_message)
                for ret in ast.walk(node):
                    if isinstance(ret, ast.Return) and ret.value is not None:
                        value = constants.get(ret.value.id) if isinstance(ret.value, ast.Name) else ret.value
                        if value is not None and _is_message(value):
                            sites.append((rel, ret.lineno, ast.get_source_segment(src, value)))
            elif (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in LOG_METHODS
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "logger"
            ):
                sites.append((rel, node.lineno, ast.get_source_segment(src, node)))
    return sites


def test_see_is_short_and_fixed():
    assert see("no-gradient-at-step") == " (see docs/troubleshooting.md#no-gradient-at-step)"


def test_docs_helper_imports_only_the_standard_library():
    tree = ast.parse((PACKAGE / "_docs.py").read_text(encoding="utf-8"))
    imported = [
        alias.name if isinstance(node, ast.Import) else (node.module or "")
        for node in ast.walk(tree)
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for alias in node.names
    ]
    assert set(imported) <= {"__future__"}, imported


def test_enough_sites_found():
    sites = message_sites()
    assert len(sites) >= MIN_SITES, f"only {len(sites)} error/warning sites found: the AST scan is broken"


@pytest.mark.parametrize("site", message_sites(), ids=lambda s: f"{s[0]}:{s[1]}")
def test_message_links_its_troubleshooting_entry(site):
    rel, line, source = site
    linked = SEE.findall(source)
    assert linked, f'{rel}:{line}: the message has no see("<anchor>") pointer to docs/troubleshooting.md'
    known = anchors(TROUBLESHOOTING)
    unknown = [a for a in linked if a not in known]
    assert not unknown, f"{rel}:{line}: no heading in docs/troubleshooting.md with anchor {unknown}"
