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


def test_private_framework_attributes_are_read_only_in_compat():
    """A private attribute of torch, FSDP2 or DeepSpeed named outside _compat.py (an allow-list
    keeps the few the DeepSpeed patch must override by name)."""
    private = ("._local_tensor", "._fsdp_param_groups", "_execution_engine", "._global_grad_norm",
               "_current_graph_task_id", "_will_engine_execute_node", "_current_autograd_node",
               "_get_module_fsdp_state", "._optimizers")
    for path in PACKAGE.rglob("*.py"):
        if path.name == "_compat.py":
            continue
        source = path.read_text()
        found = [name for name in private if name in source]
        assert not found, (path.relative_to(PACKAGE), found)
