"""`make run`'s launcher keeps the worker up: one that dies is started again, one that keeps dying stops
Graft with the reason instead of looping."""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path

import pytest

from app import cli
from graft.config import Settings
from tests.helpers import wait_for


def launch(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, worker_code: str) -> int:
    settings = Settings(home=tmp_path, database_url=f"sqlite:///{tmp_path / 'graft.db'}")  # type: ignore[call-arg]
    monkeypatch.setattr(cli, "prestart", lambda _settings: None)
    monkeypatch.setattr(cli, "_wait_until_up", lambda _url, _process: True)
    monkeypatch.setattr(
        cli, "api_command", lambda _settings: [sys.executable, "-c", "import time; time.sleep(60)"]
    )
    monkeypatch.setattr(cli, "worker_command", lambda _settings: [sys.executable, "-c", worker_code])
    return cli.run(settings)


def test_a_worker_that_keeps_dying_stops_graft_with_the_reason(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert launch(monkeypatch, tmp_path, "import sys; sys.exit(3)") == 1
    out, err = capsys.readouterr()
    assert out.count("starting it again") == cli.WORKER_RESTART_LIMIT
    assert f"the worker exited {cli.WORKER_RESTART_LIMIT + 1} times within 60 s (last: exit status 3)" in err


def test_a_worker_that_dies_once_is_started_again(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The first worker dies at once; the one started in its place leaves a mark and stays up. Then Graft is
    # stopped as a service manager stops it (SIGTERM to the launcher).
    marker = tmp_path / "restarted"
    code = (
        "import os, sys, time\n"
        f"marker = {str(marker)!r}\n"
        "if not os.path.exists(marker + '.first'):\n"
        "    open(marker + '.first', 'w').close(); sys.exit(1)\n"
        "open(marker, 'w').close(); time.sleep(60)\n"
    )

    def stop_when_restarted() -> None:
        wait_for(marker.exists, 30, interval=0.2, message="the second worker")
        os.kill(os.getpid(), signal.SIGTERM)

    before = signal.getsignal(signal.SIGTERM)
    threading.Thread(target=stop_when_restarted, daemon=True).start()
    assert launch(monkeypatch, tmp_path, code) == 0
    out, err = capsys.readouterr()
    assert out.count("starting it again") == 1 and "(exit status 1)" in out
    assert "Stopping Graft" in out and "Graft stopped because" not in err
    assert signal.getsignal(signal.SIGTERM) is before, "the launcher restores the signal handlers it replaced"
