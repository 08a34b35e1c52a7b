"""The layer rule of CONTRIBUTING.md, read from the source: which module may import which."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "adascale_shard"


def runtime_imports(path: Path) -> set[str]:
    """Absolute names of the modules ``path`` imports at run time (not under TYPE_CHECKING)."""
    tree = ast.parse(path.read_text())
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    skipped = {
        id(node)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and getattr(block.test, "id", None) == "TYPE_CHECKING"
        for node in ast.walk(block)
    }
    names = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join([*base, node.module] if node.module else base)
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def test_the_estimator_math_imports_no_torch():
    for module in ("estimators.py", "advisor/model.py"):
        imports = runtime_imports(PACKAGE / module)
        assert not any(name == "torch" or name.startswith("torch.") for name in imports), (module, imports)


def test_the_capture_never_imports_an_engine():
    imports = runtime_imports(PACKAGE / "capture.py")
    assert not any(name.startswith("adascale_shard.engines") for name in imports), imports


@pytest.mark.parametrize("engine", sorted(p.name for p in (PACKAGE / "engines").glob("*.py")))
def test_an_engine_imports_no_integration_and_no_optimizer_shell(engine):
    imports = runtime_imports(PACKAGE / "engines" / engine)
    shell = ("adascale_shard.integrations", "adascale_shard.optimizer", "adascale_shard.schedule", "adascale_shard.unwrap")
    assert not any(name.startswith(shell) for name in imports), imports


# The private attributes of AdaScale that its engines and integrations reach across modules
# (issue 25's "public engine interface" will replace them); the package's own, so allowed.
CROSS_MODULE_PRIVATE = {
    "_capture": "AdaScale's MicroGradCapture, which the FSDP1/FSDP2/DeepSpeed engines hook into",
    "_engine": "AdaScale's engine, read by FSDP2's attach and the DeepSpeed engine's install",
    "_install_engine": "how an engine connects itself to AdaScale (docs/architecture.md, Adding an engine)",
    "_stop_auto_attach": "FSDP2's attach removes AdaScale's AutoAttach forward pre-hook",
    "_drop_window": "the DeepSpeed patch drops AdaScale's window when DeepSpeed skips a step",
}
OWN_MARKER = "_adascale"  # what the package itself sets on foreign objects: _adascale_*, _adascale_shard_*
ACCESSORS = {"getattr", "hasattr", "setattr", "delattr"}
SELF = {"self", "cls", "super()", "type(self)"}


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _class_defined(tree: ast.AST) -> set[str]:
    """Private names a class of ``tree`` defines: methods, class attributes, ``self._x = ...``."""
    names = set()
    for cls in (node for node in ast.walk(tree) if isinstance(node, ast.ClassDef)):
        for stmt in cls.body:
            if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)):
                names.add(stmt.name)
            targets = stmt.targets if isinstance(stmt, ast.Assign) else [getattr(stmt, "target", None)]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
        for node in ast.walk(cls):
            targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
            for t in (leaf for target in targets if target is not None for leaf in ast.walk(target)):
                if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id in ("self", "cls"):
                    names.add(t.attr)
    return {name for name in names if _private(name)}


def foreign_private_accesses(source: str, package_defined: set[str]) -> list[str]:
    """Each private attribute ``source`` reaches that is not the package's own. Allowed: names
    starting ``_adascale``; ``self``/``cls``/``super()``/``type(self)`` receivers with a name a
    class of the package defines; any receiver with a name a class of this same module defines;
    the names of ``CROSS_MODULE_PRIVATE``. Flagged: every other ``x._name``, every other
    ``getattr/hasattr/setattr/delattr(x, "_name")``, and imports of a private name or module
    from outside the package."""
    tree = ast.parse(source)
    module_defined = _class_defined(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            receiver, name = ast.unparse(node.value), node.attr
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ACCESSORS
            and len(node.args) >= 2
            and isinstance(node.args[1], ast.Constant)
            and isinstance(node.args[1].value, str)
        ):
            receiver, name = ast.unparse(node.args[0]), node.args[1].value
        elif isinstance(node, ast.ImportFrom) and not node.level and not (node.module or "").startswith("adascale_shard"):
            names = ", ".join(alias.name for alias in node.names)
            parts = (node.module or "").split(".") + [alias.name for alias in node.names]
            found += [f"line {node.lineno}: from {node.module} import {names}"] if any(map(_private, parts)) else []
            continue
        elif isinstance(node, ast.Import):
            found += [f"line {node.lineno}: import {a.name}" for a in node.names if any(map(_private, a.name.split(".")))]
            continue
        else:
            continue
        if not _private(name) or name.startswith(OWN_MARKER) or name in CROSS_MODULE_PRIVATE:
            continue
        if name in module_defined or (receiver in SELF and name in package_defined):
            continue
        found.append(f"line {node.lineno}: {receiver}.{name}")
    return found


def _modules() -> list[Path]:
    return [path for path in sorted(PACKAGE.rglob("*.py")) if path.name != "_compat.py"]


def test_private_framework_attributes_are_read_only_in_compat():
    """A private attribute of torch, FSDP1/2, DeepSpeed, Accelerate or Transformers is named only in
    _compat.py, as an attribute or a getattr-style string."""
    package_defined = set().union(*(_class_defined(ast.parse(path.read_text())) for path in _modules()))
    for path in _modules():
        found = foreign_private_accesses(path.read_text(), package_defined)
        assert not found, (str(path.relative_to(PACKAGE)), found)


def test_the_private_attribute_check_flags_foreign_ones():
    source = """
from torch.distributed.fsdp._fully_shard import _fsdp_state
import torch.distributed.fsdp._flat_param
from torch.optim.optimizer import _global_optimizer_pre_hooks

class Shell(torch.optim.Optimizer):
    def __init__(self):
        self._mine = 1
        self._patch_step_function()  # torch's, inherited: not the package's own

    def _helper(self, engine, module, other):
        self._helper(engine, module, other)
        other._mine  # defined by a class of this module
        getattr(engine, "_optimizers")
        hasattr(module, "_handle")
        module._handle
        accelerator._adascale_trainer_flow = True
        optimizer._capture
"""
    found = sorted(foreign_private_accesses(source, package_defined=set()), key=lambda f: int(f.split()[1][:-1]))
    assert found == [
        "line 2: from torch.distributed.fsdp._fully_shard import _fsdp_state",
        "line 3: import torch.distributed.fsdp._flat_param",
        "line 4: from torch.optim.optimizer import _global_optimizer_pre_hooks",
        "line 9: self._patch_step_function",
        "line 14: engine._optimizers",
        "line 15: module._handle",
        "line 16: module._handle",
    ], found
