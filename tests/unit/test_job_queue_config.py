"""The job queue's pure parts: job ids, limits from the environment, backoff, the nats-server config
and the listing check's minimum validation."""

from __future__ import annotations

from pathlib import Path

import pytest

from meshserve.errors import InvalidInput
from meshserve.queue.config import QueueConfig, check_job_id
from meshserve.queue.dev import NatsDevConfig, nats_server_binary, server_conf


@pytest.mark.parametrize("job_id", ["a", "job-1_B", "x" * 64])
def test_good_job_ids(job_id: str) -> None:
    assert check_job_id(job_id) == job_id


@pytest.mark.parametrize("job_id", ["", "a.b", "a*", "a>", "with space", "x" * 65, "é"])
def test_job_ids_that_are_not_subject_tokens_or_kv_keys_are_refused(job_id: str) -> None:
    with pytest.raises(InvalidInput, match="job_id"):
        check_job_id(job_id)


def test_limits_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESHSERVE_JOBS_MAX_JOBS", "7")
    monkeypatch.setenv("MESHSERVE_JOBS_MAX_DELIVERIES", "2")
    monkeypatch.setenv("MESHSERVE_JOBS_BACKOFF_S", "0.1,0.3")
    config = QueueConfig.from_env()
    assert (config.max_jobs, config.max_deliveries, config.backoff_s) == (7, 2, (0.1, 0.3))
    assert [config.backoff(a) for a in (1, 2, 3, 9)] == [0.1, 0.3, 0.3, 0.3]
    assert QueueConfig.from_env(max_jobs=9).max_jobs == 9
    assert config.subject("search") == "meshserve.jobs.run.search"
    assert config.dead_subject("j1") == "meshserve.jobs.dead.j1"


@pytest.mark.parametrize("bad", [{"max_jobs": 0}, {"max_deliveries": 0}, {"max_bytes": 10}, {"job_timeout_s": 0},
                                 {"ack_wait_s": 0.1}])  # fmt: skip
def test_unbounded_or_useless_limits_are_refused(bad: dict) -> None:
    with pytest.raises(ValueError):
        QueueConfig(**bad)


def test_the_nats_server_config_enables_jetstream_on_the_store(tmp_path: Path) -> None:
    text = server_conf(NatsDevConfig(store_dir=tmp_path / "nats", port=4333, monitor_port=8333))
    assert 'listen: "127.0.0.1:4333"' in text and "http_port: 8333" in text
    assert f'jetstream {{ store_dir: "{tmp_path / "nats"}" }}' in text
    assert Path(nats_server_binary()).is_file()
