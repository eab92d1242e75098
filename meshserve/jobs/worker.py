"""`meshserve worker`: takes jobs from the durable consumer, runs each through the gateway, stores the
outcome, and only then acknowledges. A run that fails is retried with backoff; after the configured
deliveries the job is dead-lettered. A GrpcProcess workload, so it has health, registration as
`meshserve-worker`, and a drain on SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from prometheus_client import REGISTRY, Counter, Gauge, Histogram

from meshserve import telemetry
from meshserve.errors import InvalidInput
from meshserve.jobs.runners import GatewayRunner, RunFailed
from meshserve.queue.config import WORKER_SERVICE, QueueConfig, check_job_id
from meshserve.queue.connect import connect, find_nats
from meshserve.queue.store import SUBMITTED_HEADER, Claim, JobQueue
from meshserve.registry.config import METRICS_PORT_META, RegistryConfig, ServiceInstance
from meshserve.rpc.https import serve_metrics
from meshserve.rpc.process import GrpcProcess, ProcessConfig
from meshserve.rpc.tls_files import TlsFiles
from meshserve.v1 import jobs_pb2

log = logging.getLogger(__name__)
_TRACER = trace.get_tracer("meshserve.jobs")

RUNS = Counter("meshserve_jobs_runs_total", "Runs of jobs by kind and outcome (succeeded, retried, "
               "dead_lettered, already_done, handed_back, store_failed, not_a_job)", ["kind", "outcome"])
ATTEMPTS = Histogram("meshserve_jobs_attempts", "Deliveries a job took to reach its final state", ["kind"],
                     buckets=(1, 2, 3, 4, 5, 8, 13, 21))
RUN_SECONDS = Histogram("meshserve_jobs_run_seconds", "Time of one run of a job", ["kind"],
                        buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
QUEUE_DEPTH = Gauge("meshserve_jobs_queue_depth", "Jobs queued or in a worker's hand (not yet acknowledged)")
OLDEST_AGE = Gauge("meshserve_jobs_oldest_age_seconds", "Age of the oldest job not yet acknowledged")
DEAD_LETTERS = Gauge("meshserve_jobs_dead_letters", "Jobs parked on the dead-letter subjects")


@dataclass(frozen=True)
class WorkerConfig:
    registry: RegistryConfig | None
    queue: QueueConfig = field(default_factory=QueueConfig.from_env)
    nats_url: str | None = None
    gateway: str | None = None  # None: passing meshserve-gateway instances from the registry
    host: str = "127.0.0.1"
    port: int = 0  # the worker's health endpoint
    concurrency: int = 1  # jobs in hand at once
    register: bool = True
    metrics_port: int | None = None
    check_interval_s: float = 1.0
    grace_s: float = 30.0
    connect_timeout_s: float = 60.0
    port_file: Path | None = None
    trace_file: Path | None = None
    tls: TlsFiles | None = None  # mTLS for its health port and its calls to the gateway (None: plaintext)

    def __post_init__(self) -> None:
        if not 1 <= self.concurrency <= 64:
            raise ValueError(f"--concurrency {self.concurrency} is outside [1, 64]")


class Worker:
    services: tuple[str, ...] = ()  # health and reflection only

    def __init__(self, config: WorkerConfig):
        self.config = config
        self.runner = GatewayRunner(config.registry, config.gateway, config.tls)
        self.queue: JobQueue | None = None
        self._sub: Any = None
        self._draining = False
        self._in_hand = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._metrics_port: int | None = None  # bound by start(); 0 in the config means any free port

    def add_to_server(self, server: grpc.aio.Server) -> None:
        """A worker serves no calls; the process's health tells whether it takes jobs."""

    async def start(self) -> None:
        cfg = self.config
        if cfg.metrics_port is not None:
            self._metrics_port = serve_metrics(cfg.metrics_port, cfg.host, REGISTRY, cfg.tls)
        self.queue = await self._open_queue()
        from nats.js.api import AckPolicy, ConsumerConfig

        q = cfg.queue
        consumer = ConsumerConfig(durable_name=q.consumer, ack_policy=AckPolicy.EXPLICIT, ack_wait=q.ack_wait_s,
                                  max_deliver=-1, max_ack_pending=max(64, q.max_jobs // 10),
                                  filter_subject=f"{q.subject_prefix}.*")  # fmt: skip
        self._sub = await self.queue.js.pull_subscribe(f"{q.subject_prefix}.*", durable=q.consumer,
                                                       stream=q.stream, config=consumer)  # fmt: skip
        self._tasks = [asyncio.create_task(self._take_jobs())]
        self._tasks.append(asyncio.create_task(self._report_depth()))

    async def _open_queue(self) -> JobQueue:
        deadline = time.monotonic() + self.config.connect_timeout_s
        while True:
            url = await find_nats(self.config.registry, self.config.nats_url)
            try:
                nc = await connect(url, WORKER_SERVICE)
                queue = await JobQueue(nc, self.config.queue).ensure()
                log.info("taking jobs from %s (stream %s)", url, self.config.queue.stream)
                return queue
            except Exception as exc:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"no job queue at {url} after {self.config.connect_timeout_s:.0f}s") from exc
                log.warning("job queue at %s: %s; retrying", url, exc)
                await asyncio.sleep(0.5)

    def instance(self, port: int) -> ServiceInstance:
        cfg = self.config
        meta = {"model": "worker", "version": "1", "role": "worker", "concurrency": str(cfg.concurrency)}
        if self._metrics_port is not None:
            meta[METRICS_PORT_META] = str(self._metrics_port)
        return ServiceInstance(
            name=WORKER_SERVICE, instance_id=f"{WORKER_SERVICE}-{cfg.host}-{port}", address=cfg.host, port=port,
            meta=meta,
            check_interval_s=cfg.check_interval_s, check_timeout_s=cfg.check_interval_s,
        )  # fmt: skip

    def begin_draining(self) -> None:
        """Take no new job; the ones in hand finish within the grace period (else go back, see close)."""
        self._draining = True

    def in_flight(self) -> int:
        return self._in_hand

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.runner.close()
        if self.queue is not None:
            try:  # acks and naks still buffered go out; NATS away must not hold the exit
                await asyncio.wait_for(self.queue.nc.drain(), 5.0)
            except Exception:  # noqa: BLE001
                await self.queue.nc.close()

    # -- the loop -------------------------------------------------------------------------------

    async def _take_jobs(self) -> None:
        """One fetch loop (a pull subscription serves one fetch at a time), a job task per message,
        at most `concurrency` in hand."""
        import nats.errors

        slots = asyncio.Semaphore(self.config.concurrency)
        running: set[asyncio.Task[None]] = set()
        try:
            while not self._draining:
                await slots.acquire()
                try:
                    msgs = await self._sub.fetch(1, timeout=1.0)
                except nats.errors.TimeoutError:
                    slots.release()
                    continue
                except Exception as exc:  # noqa: BLE001 - NATS away: wait for the reconnect
                    slots.release()
                    log.warning("fetching jobs: %s", exc)
                    await asyncio.sleep(0.5)
                    continue
                for msg in msgs:
                    if self._draining:
                        await _quietly(msg.nak())  # hand it back at once: another worker takes it
                        slots.release()
                        continue
                    task = asyncio.create_task(self._hold(msg))
                    running.add(task)
                    task.add_done_callback(running.discard)
                    task.add_done_callback(lambda _: slots.release())
            while running:  # draining: the jobs in hand finish (close() cancels them after the grace)
                await asyncio.wait(set(running))
        finally:
            for task in running:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)

    async def _hold(self, msg: Any) -> None:
        self._in_hand += 1
        try:
            await self._handle(msg)
        finally:
            self._in_hand -= 1

    async def _handle(self, msg: Any) -> None:
        request = jobs_pb2.SubmitJobRequest()
        try:
            request.ParseFromString(msg.data)
            check_job_id(request.job_id)
            kind = request.WhichOneof("payload") or ""
            if not kind:
                raise InvalidInput("no payload")
        except (DecodeError, InvalidInput) as exc:  # not a job any gateway queued: never deliver it again
            log.error("dropping a message on %s that is not a job (%s)", msg.subject, exc)
            await _quietly(msg.term())
            RUNS.labels("unknown", "not_a_job").inc()
            return
        headers = dict(msg.headers or {})
        parent = telemetry.extract_context(headers.items())
        attempt = msg.metadata.num_delivered
        with _TRACER.start_as_current_span(f"job {kind}", context=parent, kind=SpanKind.CONSUMER,
                                           attributes={"job.id": request.job_id, "job.attempt": attempt}) as span:
            try:
                outcome = await self._run(msg, request, kind, attempt, float(headers.get(SUBMITTED_HEADER, 0)))
            except asyncio.CancelledError:  # drained past the grace period: hand the job back
                await asyncio.shield(_quietly(msg.nak()))
                RUNS.labels(kind, "handed_back").inc()
                raise
            except Exception as exc:  # noqa: BLE001 - the queue away mid-run: the message comes back
                log.warning("job %s: %s; it will be delivered again", request.job_id, exc)
                outcome = "store_failed"
                span.set_status(Status(StatusCode.ERROR, str(exc)))
            RUNS.labels(kind, outcome).inc()
            span.set_attribute("job.outcome", outcome)

    async def _run(self, msg: Any, request: jobs_pb2.SubmitJobRequest, kind: str, attempt: int,
                   submitted_at: float) -> str:  # fmt: skip
        assert self.queue is not None
        q = self.config.queue
        claim = await self.queue.claim(request.job_id, kind, attempt, submitted_at, telemetry.trace_id_of())
        if claim is None:  # final already (a run before a crash stored it): nothing to run twice
            await msg.ack_sync()
            return "already_done"
        if attempt > q.max_deliveries:  # its earlier runs died with their workers
            error = claim.job.error or f"no run finished in {q.max_deliveries} deliveries"
            return await self._dead_letter(msg, claim, kind, error)

        began = time.monotonic()
        heartbeat = asyncio.create_task(_heartbeat(msg, q.ack_wait_s / 3))
        try:
            done = await self.runner.run(request, time.monotonic() + q.job_timeout_s)
        except RunFailed as exc:
            error = str(exc)
        else:
            error = ""
        finally:
            heartbeat.cancel()
            RUN_SECONDS.labels(kind).observe(time.monotonic() - began)

        if not error:
            update = _copy(claim.job)
            update.MergeFrom(done)
            update.state, update.error = jobs_pb2.JOB_STATE_SUCCEEDED, ""
            if not await self.queue.finish(claim, update):
                log.warning("job %s: another run stored its result first; this one is dropped", request.job_id)
            await msg.ack_sync()  # only now: the result is stored
            ATTEMPTS.labels(kind).observe(attempt)
            return "succeeded"
        if attempt >= q.max_deliveries:
            return await self._dead_letter(msg, claim, kind, error)
        update = _copy(claim.job)
        update.state, update.error = jobs_pb2.JOB_STATE_QUEUED, error
        await self.queue.finish(claim, update)
        delay = q.backoff(attempt)
        log.info("job %s attempt %d failed (%s); again in %.1fs", request.job_id, attempt, error, delay)
        await msg.nak(delay=delay)
        return "retried"

    async def _dead_letter(self, msg: Any, claim: Claim, kind: str, error: str) -> str:
        assert self.queue is not None
        await self.queue.dead_letter(claim, msg.data, error)
        await msg.ack_sync()
        ATTEMPTS.labels(kind).observe(claim.job.attempts)
        log.warning("job %s dead-lettered after %d deliveries: %s", claim.job.job_id, claim.job.attempts, error)
        return "dead_lettered"

    async def _report_depth(self) -> None:
        while True:
            if self.queue is not None:
                try:
                    depth = await self.queue.depth()
                    QUEUE_DEPTH.set(depth.queued)
                    OLDEST_AGE.set(depth.oldest_age_s)
                    DEAD_LETTERS.set(depth.dead_letters)
                except Exception as exc:  # noqa: BLE001 - NATS away: the gauges keep their last value
                    log.debug("queue depth: %s", exc)
            await asyncio.sleep(2.0)


async def _heartbeat(msg: Any, every_s: float) -> None:
    """Tell JetStream the job is still in hand, so a long run is not given to another worker."""
    while True:
        await asyncio.sleep(every_s)
        await _quietly(msg.in_progress())


async def _quietly(call: Any) -> None:
    try:
        await call
    except Exception as exc:  # noqa: BLE001 - NATS away: the message comes back after ack_wait anyway
        log.debug("ack/nak/heartbeat not sent: %s", exc)


def _copy(job: jobs_pb2.Job) -> jobs_pb2.Job:
    out = jobs_pb2.Job()
    out.CopyFrom(job)
    return out


async def run_worker(config: WorkerConfig) -> int:
    process = ProcessConfig(service_name=WORKER_SERVICE, host=config.host, port=config.port, max_message_bytes=1 << 20,
                            grace_s=config.grace_s, registry=config.registry if config.register else None,
                            port_file=config.port_file, trace_file=config.trace_file, tls=config.tls)  # fmt: skip
    return await GrpcProcess(Worker(config), process, lambda method, code, seconds: None).run()
