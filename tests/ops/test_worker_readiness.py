"""/ready under gunicorn waits for every worker's models, not just the answering worker's."""

from __future__ import annotations

from pathlib import Path

import pytest

from llm_api.core import worker_readiness


def test_ready_only_when_every_worker_marked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    monkeypatch.setenv(worker_readiness.WORKERS_ENV, "2")
    assert not worker_readiness.all_workers_ready()
    worker_readiness.mark_ready()  # this worker
    assert not worker_readiness.all_workers_ready()
    (tmp_path / f"{worker_readiness.PREFIX}999999").touch()  # the other worker
    assert worker_readiness.all_workers_ready()
    worker_readiness.clear(str(tmp_path), 999999)  # gunicorn's child_exit for the other one
    assert not worker_readiness.all_workers_ready()
    worker_readiness.clear(str(tmp_path))  # on_starting
    assert list(tmp_path.iterdir()) == []


def test_single_process_needs_no_markers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(worker_readiness.WORKERS_ENV, raising=False)
    assert worker_readiness.all_workers_ready()
