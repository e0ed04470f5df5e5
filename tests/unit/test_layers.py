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
            "workers/handlers.py": "import graft.db\n",
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


JOB_TABLES = {"Job", "JobEvent"}
STATEMENTS = {"select", "update", "delete", "insert", "exists"}


def job_sql_outside_the_store(root: Path) -> list[str]:
    """file:line of every statement on the jobs' tables (a column of Job or JobEvent, or select/update/
    delete/insert/exists over them) outside graft/job_store.py and the table definitions."""
    import ast

    found = []
    for package in ("app", "workers", "graft", "ml"):
        for path in sorted((root / package).rglob("*.py")):
            relative = path.relative_to(root).as_posix()
            if relative in ("graft/job_store.py", "graft/tables.py"):
                continue
            for node in ast.walk(ast.parse(path.read_text(), relative)):
                column = (
                    isinstance(node, ast.Attribute)
                    and isinstance(node.value, ast.Name)
                    and node.value.id in JOB_TABLES
                )
                statement = (
                    isinstance(node, ast.Call)
                    and isinstance(node.func, ast.Name)
                    and node.func.id in STATEMENTS
                    and any(isinstance(a, ast.Name) and a.id in JOB_TABLES for a in node.args)
                )
                if column or statement:
                    found.append(f"{relative}:{node.lineno}")  # type: ignore[attr-defined]
    return found


def test_every_job_state_change_goes_through_the_job_store(tmp_path: Path) -> None:
    """One owner of job state (graft/job_store.py): no other module queries or updates the jobs' tables;
    the same scan finds a planted update and a planted column filter."""
    assert job_sql_outside_the_store(ROOT) == []
    write(
        tmp_path,
        {
            "graft/job_store.py": "update(Job).where(Job.id == 1)\n",  # the store itself may
            "app/reaper.py": "session.execute(update(Job).values(status='failed'))\n",
            "workers/runner.py": "x = 1\nrows = select(Model).where(Job.status == 'running')\n",
            "ml/__init__.py": "",
        },
    )
    assert job_sql_outside_the_store(tmp_path) == ["app/reaper.py:1", "workers/runner.py:2"]
