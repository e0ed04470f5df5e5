"""Settings, API key handling and the bootstrap of the admin key."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError
from sqlalchemy import func, select

from app.cli import prestart
from app.core.security import digest_matches, generate_api_key, key_digest, key_lookup
from graft.config import Settings
from graft.db import make_engine, make_session_factory, session_scope
from graft.tables import ApiKey, Project


def test_defaults_are_the_embedded_setup(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("GRAFT_HOME", "GRAFT_DATABASE_URL", "GRAFT_BROKER_URL", "GRAFT_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    settings = Settings()
    assert settings.home == tmp_path / "var"
    assert settings.effective_database_url == f"sqlite:///{tmp_path / 'var' / 'graft.db'}"
    assert settings.uses_filesystem_broker
    assert settings.port == 8000
    assert settings.max_upload_bytes == 2 * 1024**3
    assert settings.worker_queue == "gpu"


def test_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("GRAFT_HOME", str(tmp_path / "data"))
    monkeypatch.setenv("GRAFT_PORT", "9100")
    monkeypatch.setenv("GRAFT_DATABASE_URL", "postgresql+psycopg://u@db/graft")
    monkeypatch.setenv("GRAFT_BROKER_URL", "redis://cache:6379/0")
    monkeypatch.setenv("GRAFT_MAX_UPLOAD_BYTES", "1000")
    monkeypatch.setenv("GRAFT_WORKER_QUEUE", "a100")
    settings = Settings()
    assert settings.home == tmp_path / "data" and settings.storage_dir == tmp_path / "data" / "storage"
    assert settings.port == 9100 and settings.max_upload_bytes == 1000 and settings.worker_queue == "a100"
    assert settings.effective_database_url.startswith("postgresql") and not settings.uses_filesystem_broker


def test_bad_settings_fail_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRAFT_BOOTSTRAP_API_KEY", "short")
    with pytest.raises(ValidationError, match="at least 16 characters"):
        Settings()
    monkeypatch.delenv("GRAFT_BOOTSTRAP_API_KEY")
    monkeypatch.setenv("GRAFT_PORT", "99999")
    with pytest.raises(ValidationError):
        Settings()


def test_key_digests() -> None:
    key = generate_api_key()
    assert key != generate_api_key()
    assert digest_matches(key, key_digest(key))
    assert not digest_matches(key + "x", key_digest(key))
    assert key_lookup(key) not in key_digest(key)


def count(settings: Settings, table: type[ApiKey] | type[Project]) -> int:
    engine = make_engine(settings.effective_database_url)
    with session_scope(make_session_factory(engine)) as session:
        result = session.scalar(select(func.count()).select_from(table))
    engine.dispose()
    return int(result or 0)


def test_bootstrap_generates_one_key_and_reuses_it(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path)
    first = prestart(settings)
    assert first is not None and first.startswith("graft_")
    assert (tmp_path / "admin.key").read_text().strip() == first
    assert prestart(settings) == first
    assert count(settings, ApiKey) == 1 and count(settings, Project) == 1


def test_bootstrap_with_a_key_from_the_environment(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path, bootstrap_api_key="k" * 32)  # type: ignore[arg-type]
    assert prestart(settings) is None  # never echoed
    assert prestart(settings) is None
    assert not (tmp_path / "admin.key").exists()
    assert count(settings, ApiKey) == 1


def test_celery_is_configured_for_long_training_tasks(tmp_path: Path) -> None:
    from graft.queueing import RUN_JOB, make_celery

    settings = Settings(home=tmp_path, worker_queue="a100")
    conf = make_celery(settings).conf
    assert conf.task_acks_late is True
    assert conf.worker_prefetch_multiplier == 1
    assert conf.task_serializer == "json" and conf.accept_content == ["json"]
    assert conf.task_ignore_result is True and conf.result_backend is None
    assert conf.task_routes[RUN_JOB] == {"queue": "a100"}
    # The embedded broker keeps every folder under GRAFT_HOME, none in the working directory.
    options = conf.broker_transport_options
    for key in ("data_folder_in", "data_folder_out", "processed_folder", "control_folder"):
        assert Path(options[key]).is_relative_to(tmp_path), key
