"""The `jobs` commands' side: Submit and Get through the gateway, listing and requeueing through NATS."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import grpc
from google.protobuf import json_format

from meshserve.queue.config import QueueConfig
from meshserve.queue.connect import connect, find_nats
from meshserve.queue.store import FINAL, JobQueue
from meshserve.registry.config import SERVICE_NAMES, RegistryConfig
from meshserve.rpc import tls
from meshserve.rpc.tls_files import client_files
from meshserve.v1 import jobs_pb2, jobs_pb2_grpc


def state_name(state: int) -> str:
    return jobs_pb2.JobState.Name(state).removeprefix("JOB_STATE_").lower()


def _channel(gateway: str, options: list[tuple[str, int]]) -> grpc.Channel:
    """To the gateway: mTLS with MESHSERVE_TLS_* or the local mesh's credentials, else plaintext."""
    return tls.channel(gateway, SERVICE_NAMES["gateway"], options, client_files())


def submit(gateway: str, request: jobs_pb2.SubmitJobRequest, timeout: float) -> jobs_pb2.SubmitJobResponse:
    with _channel(gateway, [("grpc.max_send_message_length", 16 << 20)]) as channel:
        return jobs_pb2_grpc.JobsStub(channel).Submit(request, timeout=timeout)


def get(gateway: str, job_id: str, timeout: float) -> jobs_pb2.Job:
    with _channel(gateway, [("grpc.max_receive_message_length", 16 << 20)]) as channel:
        return jobs_pb2_grpc.JobsStub(channel).Get(jobs_pb2.GetJobRequest(job_id=job_id), timeout=timeout)


def watch(gateway: str, job_id: str) -> Iterator[jobs_pb2.Job]:
    """The job now and every change of it until final (the gateway ends a watch after 10 minutes)."""
    with _channel(gateway, [("grpc.max_receive_message_length", 16 << 20)]) as channel:
        yield from jobs_pb2_grpc.JobsStub(channel).Watch(jobs_pb2.GetJobRequest(job_id=job_id))


def wait_final(gateway: str, job_id: str, timeout: float, wait_s: float) -> jobs_pb2.Job:
    """Poll Get until the job is final (SUCCEEDED, FAILED, DEAD_LETTERED) or `wait_s` passes."""
    deadline = time.monotonic() + wait_s
    pause = 0.05
    while True:
        job = get(gateway, job_id, timeout)
        if job.state in FINAL:
            return job
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} still {state_name(job.state)} after {wait_s:.0f}s")
        time.sleep(pause)
        pause = min(pause * 1.5, 1.0)


def job_json(job: jobs_pb2.Job, compact: bool = False) -> str:
    data: dict[str, Any] = json_format.MessageToDict(job, preserving_proto_field_name=True)
    data["state"] = state_name(job.state)
    if compact:
        data.pop("search", None)
        data.pop("check", None)
    return json.dumps(data, separators=(",", ":")) if compact else json.dumps(data, indent=2)


def render_line(job: jobs_pb2.Job) -> str:
    when = time.strftime("%H:%M:%S", time.localtime(job.submitted_at)) if job.submitted_at else "-"
    line = f"{job.job_id:<34} {job.kind or '-':<7} {state_name(job.state):<14} attempts {job.attempts:<2} {when}"
    return f"{line}  {job.error}" if job.error else line


def render(job: jobs_pb2.Job) -> str:
    lines = [render_line(job)]
    if job.trace_id:
        lines.append(f"trace {job.trace_id}")
    if job.HasField("search"):
        for d in job.search.detections:
            best = ", ".join(f"{m.item_id} ({m.score:.3f})" for m in d.matches[:3])
            lines.append(f"  {d.label} {d.score:.2f}: {best}")
    if job.HasField("check"):
        lines.append(f"  flagged {job.check.flagged}  partial {job.check.partial}")
        lines += [f"  {v.model} {v.score:.3f}{' flagged' if v.flagged else ''}" for v in job.check.verdicts]
    return "\n".join(lines)


async def _open(nats_url: str | None, consul: str | None) -> JobQueue:
    url = await find_nats(RegistryConfig.from_env(http_addr=consul), nats_url)
    from meshserve.queue.store import queue_errors

    with queue_errors(f"connect to {url}"):
        nc = await connect(url, "meshserve-jobs-cli")
    return await JobQueue(nc, QueueConfig.from_env()).ensure()


async def list_jobs(nats_url: str | None, consul: str | None, states: frozenset[str], limit: int) -> list[jobs_pb2.Job]:
    queue = await _open(nats_url, consul)
    try:
        wanted = frozenset(jobs_pb2.JobState.Value(f"JOB_STATE_{s.upper()}") for s in states)
        return await queue.list(wanted, limit)
    finally:
        await queue.nc.close()


async def dead_letters(nats_url: str | None, consul: str | None) -> list[jobs_pb2.Job]:
    return await list_jobs(nats_url, consul, frozenset({"dead_lettered"}), 10_000)


async def requeue(nats_url: str | None, consul: str | None, job_id: str) -> jobs_pb2.Job:
    queue = await _open(nats_url, consul)
    try:
        return await queue.requeue(job_id)
    finally:
        await queue.nc.close()
