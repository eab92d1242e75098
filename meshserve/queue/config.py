"""Where NATS is and how the job stream, dead letters and result bucket are bounded."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from meshserve.errors import InvalidInput

DEFAULT_NATS_URL = "nats://127.0.0.1:4222"
# (contract) registry service names of the queue's processes, beside registry/config.py SERVICE_NAMES
NATS_SERVICE = "meshserve-nats"
WORKER_SERVICE = "meshserve-worker"

# A job id is a KV key and a subject token: no dots, wildcards or spaces.
_JOB_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def check_job_id(job_id: str) -> str:
    if not _JOB_ID_RE.match(job_id):
        raise InvalidInput(f"job_id: {job_id[:80]!r} must be 1–64 letters, digits, '-' or '_'")
    return job_id


@dataclass(frozen=True)
class QueueConfig:
    """The JetStream objects of the job queue and their limits. Every process that touches the
    queue uses the same values; the first one to start creates the objects with them."""

    stream: str = "MESHSERVE_JOBS"
    subject_prefix: str = "meshserve.jobs.run"  # + .<kind>
    dead_stream: str = "MESHSERVE_JOBS_DEAD"
    dead_prefix: str = "meshserve.jobs.dead"  # + .<job id>
    bucket: str = "meshserve-jobs"
    consumer: str = "meshserve-workers"
    max_jobs: int = 10_000  # queued, not yet acknowledged
    max_bytes: int = 256 * 1024 * 1024
    max_job_bytes: int = 10 * 1024 * 1024
    result_ttl_s: float = 24 * 3600.0
    bucket_bytes: int = 512 * 1024 * 1024
    history: int = 5  # revisions kept per job: the state changes, so a second result would show
    duplicate_window_s: float = 600.0  # Nats-Msg-Id dedup of resubmissions
    max_deliveries: int = 5
    ack_wait_s: float = 10.0  # a job held this long without a heartbeat goes to another worker
    backoff_s: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0)
    job_timeout_s: float = 30.0  # deadline of one run of a job

    def __post_init__(self) -> None:
        if self.max_jobs < 1 or self.max_bytes < 1024 or self.max_deliveries < 1:
            raise ValueError("need max_jobs ≥ 1, max_bytes ≥ 1024 and max_deliveries ≥ 1")
        if not (self.job_timeout_s > 0 and self.ack_wait_s > 0.5):
            raise ValueError("need job_timeout_s > 0 and ack_wait_s > 0.5")

    def subject(self, kind: str) -> str:
        return f"{self.subject_prefix}.{kind}"

    def dead_subject(self, job_id: str) -> str:
        return f"{self.dead_prefix}.{job_id}"

    def backoff(self, attempt: int) -> float:
        return self.backoff_s[min(attempt, len(self.backoff_s)) - 1] if self.backoff_s else 0.0

    @classmethod
    def from_env(cls, **overrides: object) -> QueueConfig:
        """Limits from MESHSERVE_JOBS_* variables (tests and drills shrink them), then overrides."""
        env: dict[str, object] = {}
        for name, cast in (("max_jobs", int), ("max_bytes", int), ("max_deliveries", int),
                           ("ack_wait_s", float), ("job_timeout_s", float)):  # fmt: skip
            value = os.environ.get(f"MESHSERVE_JOBS_{name.upper()}")
            if value:
                env[name] = cast(value)
        if backoff := os.environ.get("MESHSERVE_JOBS_BACKOFF_S"):
            env["backoff_s"] = tuple(float(x) for x in backoff.split(","))
        return cls(**{**env, **overrides})  # type: ignore[arg-type]
