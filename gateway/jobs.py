"""The gateway's meshserve.v1.Jobs: Submit validates like the synchronous call and queues the job on
NATS JetStream; Get answers from the job's stored record (so any gateway, also a restarted one, can)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import grpc

from meshserve import telemetry
from meshserve.errors import InvalidInput, MeshError, NotReady
from meshserve.queue.config import QueueConfig
from meshserve.queue.connect import connect, find_nats
from meshserve.queue.store import JobQueue
from meshserve.registry.config import RegistryConfig
from meshserve.v1 import jobs_pb2, jobs_pb2_grpc

log = logging.getLogger(__name__)

JOBS = jobs_pb2.DESCRIPTOR.services_by_name["Jobs"].full_name
# kind → the synchronous flow's own validation of that payload (raises InvalidInput)
Validators = Mapping[str, Callable[[Any], object]]

MAX_WATCH_S = 600.0  # a Watch without a deadline ends after this (the caller watches again)


class JobQueueLink:
    """The gateway's connection to the job queue, made in the background: the gateway serves photo
    search while NATS is away, and Jobs answers UNAVAILABLE until the queue is reachable."""

    def __init__(self, registry: RegistryConfig | None, config: QueueConfig, nats_url: str | None = None):
        self.registry = registry
        self.config = config
        self.nats_url = nats_url
        self._queue: JobQueue | None = None
        self._task: asyncio.Task[None] | None = None
        self._on_ready: Callable[[bool], None] = lambda ready: None

    def watch_ready(self, listener: Callable[[bool], None]) -> None:
        """`listener(reachable)` now and once the queue is reached."""
        self._on_ready = listener
        listener(self._queue is not None)

    def start(self) -> None:
        self._task = asyncio.create_task(self._connect())

    @property
    def queue(self) -> JobQueue:
        if self._queue is None:
            raise NotReady("the job queue is not reachable yet (no NATS); retry later")
        return self._queue

    async def _connect(self) -> None:
        delay = 0.25
        while True:
            url = await find_nats(self.registry, self.nats_url)
            try:
                nc = await connect(url, "meshserve-gateway")
                self._queue = await JobQueue(nc, self.config).ensure()
                log.info("job queue on %s", url)
                self._on_ready(True)
                return
            except Exception as exc:  # noqa: BLE001 - NATS not there yet: keep looking
                say = log.warning if delay == 0.25 else log.debug  # once, not every few seconds for ever
                say("job queue at %s not reachable (%r); Jobs answers UNAVAILABLE, retrying", url, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._queue is not None:
            await self._queue.nc.close()


class JobsServicer(jobs_pb2_grpc.JobsServicer):
    def __init__(self, link: JobQueueLink, validators: Validators):
        self.link = link
        self.validators = validators

    async def Submit(
        self, request: jobs_pb2.SubmitJobRequest, context: grpc.aio.ServicerContext
    ) -> jobs_pb2.SubmitJobResponse:
        kind = request.WhichOneof("payload")
        if kind is None:
            raise InvalidInput("payload: set one of search, check")
        self.validators[kind](getattr(request, kind))
        # The submit's server span goes with the job: the worker's run continues this trace.
        headers = dict(telemetry.inject_metadata())
        job_id, created = await self.link.queue.submit(request, headers)
        return jobs_pb2.SubmitJobResponse(job_id=job_id, created=created)

    async def Get(self, request: jobs_pb2.GetJobRequest, context: grpc.aio.ServicerContext) -> jobs_pb2.Job:
        if not request.job_id:
            raise InvalidInput("job_id: empty")
        return await self.link.queue.require(request.job_id)

    async def Watch(
        self, request: jobs_pb2.GetJobRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[jobs_pb2.Job]:
        # Streams pass the StatusInterceptor by (it wraps unary calls): map the error tree here.
        remaining = context.time_remaining()
        until = time.monotonic() + min(MAX_WATCH_S, MAX_WATCH_S if remaining is None else remaining)
        try:
            if not request.job_id:
                raise InvalidInput("job_id: empty")
            await self.link.queue.require(request.job_id)
            async for job in self.link.queue.watch(request.job_id, until):
                yield job
        except MeshError as exc:
            await context.abort(exc.code, str(exc))
