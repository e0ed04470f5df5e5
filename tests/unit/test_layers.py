"""The layers of docs/architecture.md hold: import-linter's contracts (pyproject.toml) over the real tree,
and the same checker failing on a tree with a stray import, so a kept contract means something."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LINT = [
    sys.executable,
    "-c",
    "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())",
]


def lint(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(cwd)}
    return subprocess.run([*LINT, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_the_tree_keeps_every_contract() -> None:
    result = lint(ROOT, "--no-cache")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 kept, 0 broken" in result.stdout, result.stdout


def write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))


def test_a_stray_import_breaks_the_contracts(tmp_path: Path) -> None:
    """The project's own contract section over a miniature tree: the API importing a worker module, the
    core importing torch, and a recipe reaching the database each break their contract."""
    config = (ROOT / "pyproject.toml").read_text()
    contracts = config[config.index("\n[tool.importlinter]\n") :]
    empty = {f"{pkg}/__init__.py": "" for pkg in ("app", "workers", "workers/recipes", "ml", "graft")}
    write(
        tmp_path,
        {
            **empty,
            "pyproject.toml": contracts,
            "graft/db.py": "import sqlalchemy\n",
            **{f"graft/{name}.py": "import graft.db\n" for name in ("tables", "job_store", "queueing")},
            "workers/tasks.py": "import workers.runner\n",
            "graft/spec.py": "import torch\n",  # the core must not load torch
            "ml/networks.py": "import torch\nimport graft.spec\n",
            "workers/runner.py": "import graft.db\n",
            "workers/recipes/finetune.py": "import ml.networks\nimport graft.db\n",  # a recipe on the database
            "app/serving.py": "import workers.runner\n",  # the API on the worker
        },
    )
    result = lint(tmp_path, "--no-cache")
    assert result.returncode != 0
    assert "0 kept, 3 broken" in result.stdout, result.stdout
    assert "app.serving -> workers.runner" in result.stdout
    assert "graft.spec -> torch" in result.stdout
    assert "workers.recipes.finetune -> graft.db" in result.stdout
