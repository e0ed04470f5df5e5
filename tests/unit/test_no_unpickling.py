"""Nothing a user sends is ever unpickled: weights travel as safetensors. The one torch.load reads a
file shipped inside an installed package, with weights_only=True."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ALLOWED_TORCH_LOAD = {("ml/networks.py", "_efficientnet_lite0_state_cached")}
FORBIDDEN_MODULES = {"pickle", "cPickle", "dill", "joblib", "shelve", "marshal"}


def source_files() -> list[Path]:
    return sorted(
        p for folder in ("graft", "ml", "app", "workers", "migrations") for p in (ROOT / folder).rglob("*.py")
    )


def test_no_pickle_modules_are_imported() -> None:
    for path in source_files():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] not in FORBIDDEN_MODULES, f"{path}: imports {name}"


def test_torch_load_only_reads_packaged_weights_with_weights_only() -> None:
    found = set()
    for path in source_files():
        tree = ast.parse(path.read_text())
        for function in ast.walk(tree):
            if not isinstance(function, ast.FunctionDef):
                continue
            for node in ast.walk(function):
                if (
                    isinstance(node, ast.Call)
                    and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "load"
                ):
                    owner = node.func.value
                    if isinstance(owner, ast.Name) and owner.id == "torch":
                        where = (str(path.relative_to(ROOT)), function.name)
                        assert where in ALLOWED_TORCH_LOAD, f"torch.load in {where}"
                        keywords = {k.arg: k.value for k in node.keywords}
                        assert (
                            isinstance(keywords.get("weights_only"), ast.Constant)
                            and keywords["weights_only"].value is True
                        )
                        found.add(where)
    assert found == ALLOWED_TORCH_LOAD
