"""The job queue's data path: submit (stream + record), read records, claim and finish a run,
dead-letter and requeue. A job's record is a `meshserve.v1.Job` in a JetStream KV bucket; every
change is a compare-and-set on its revision, so a result is stored once even if two workers ran it."""

from __future__ import annotations

import builtins
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from meshserve.errors import InvalidInput, NotFound, NotReady, Overloaded
from meshserve.queue.config import QueueConfig, check_job_id
from meshserve.v1 import jobs_pb2

SUBMITTED_HEADER = "Meshserve-Submitted-At"
ERROR_HEADER = "Meshserve-Error"
FINAL = frozenset({jobs_pb2.JOB_STATE_SUCCEEDED, jobs_pb2.JOB_STATE_FAILED, jobs_pb2.JOB_STATE_DEAD_LETTERED})
_STREAM_FULL = (10077, 10078)  # JetStream: maximum messages / bytes exceeded (discard new)


@dataclass(frozen=True)
class Claim:
    """A run of a job this worker owns: the record as it wrote it, and that record's revision."""

    job: jobs_pb2.Job
    revision: int


@dataclass(frozen=True)
class Depth:
    queued: int
    oldest_age_s: float
    dead_letters: int


@contextlib.contextmanager
def queue_errors(action: str) -> Iterator[None]:
    """NATS away or slow → NotReady (UNAVAILABLE), so callers retry; JetStream refusals stay themselves."""
    import nats.errors
    import nats.js.errors

    try:
        yield
    except nats.js.errors.APIError as exc:
        if exc.err_code in _STREAM_FULL:
            raise Overloaded(f"{action}: the job queue is full ({exc.description}); retry later") from exc
        raise
    except (nats.errors.Error, TimeoutError, OSError) as exc:
        raise NotReady(f"{action}: the job queue is unavailable ({type(exc).__name__}: {exc})") from exc


class JobQueue:
    def __init__(self, nc: Any, config: QueueConfig):
        self.nc = nc
        self.js = nc.jetstream(timeout=5.0)
        self.config = config
        self.kv: Any = None

    async def ensure(self) -> JobQueue:
        """Create the work stream, the dead-letter stream and the bucket if they are missing. Existing
        ones keep the limits they were made with: the first process to start sets them."""
        import nats.js.errors
        from nats.js.api import DiscardPolicy, KeyValueConfig, RetentionPolicy, StorageType, StreamConfig

        cfg = self.config
        streams = (
            StreamConfig(name=cfg.stream, subjects=[f"{cfg.subject_prefix}.*"], retention=RetentionPolicy.WORK_QUEUE,
                         max_msgs=cfg.max_jobs, max_bytes=cfg.max_bytes, max_msg_size=cfg.max_job_bytes,
                         discard=DiscardPolicy.NEW, storage=StorageType.FILE,
                         duplicate_window=cfg.duplicate_window_s),
            StreamConfig(name=cfg.dead_stream, subjects=[f"{cfg.dead_prefix}.*"], max_msgs_per_subject=1,
                         max_bytes=cfg.max_bytes, discard=DiscardPolicy.OLD, storage=StorageType.FILE,
                         duplicate_window=cfg.duplicate_window_s),
        )  # fmt: skip
        with queue_errors("set up the job queue"):
            for stream in streams:
                try:
                    await self.js.stream_info(stream.name)
                except nats.js.errors.NotFoundError:
                    await self.js.add_stream(stream)
            try:
                self.kv = await self.js.key_value(cfg.bucket)
                return self
            except nats.js.errors.BucketNotFoundError:
                pass
            self.kv = await self.js.create_key_value(KeyValueConfig(
                bucket=cfg.bucket, history=cfg.history, ttl=cfg.result_ttl_s, max_bytes=cfg.bucket_bytes,
                storage=StorageType.FILE))  # fmt: skip
        return self

    # -- submit and read ----------------------------------------------------------------------

    async def submit(self, request: jobs_pb2.SubmitJobRequest,
                     headers: Mapping[str, str] | None = None) -> tuple[str, bool]:
        """Queue a validated job; (job id, created). A known id is not queued again."""
        job_id = check_job_id(request.job_id or uuid.uuid4().hex)
        kind = request.WhichOneof("payload")
        if kind is None:
            raise InvalidInput("payload: set one of search, check")
        if await self.get(job_id) is not None:
            return job_id, False
        request = _with_id(request, job_id)
        data = request.SerializeToString()
        if len(data) > self.config.max_job_bytes:
            raise InvalidInput(f"job: {len(data)} bytes exceeds the limit of {self.config.max_job_bytes}")
        now = time.time()
        with queue_errors(f"submit {job_id}"):
            ack = await self.js.publish(self.config.subject(kind), data, stream=self.config.stream,
                                        headers={"Nats-Msg-Id": job_id, SUBMITTED_HEADER: repr(now), **(headers or {})})
            if ack.duplicate:
                return job_id, False
            job = jobs_pb2.Job(job_id=job_id, kind=kind, state=jobs_pb2.JOB_STATE_QUEUED, submitted_at=now,
                               updated_at=now, trace_id=_trace_id(headers or {}))  # fmt: skip
            await self._create(job)  # a worker quick enough to have made it already is fine
        return job_id, True

    async def get(self, job_id: str) -> jobs_pb2.Job | None:
        entry = await self._entry(check_job_id(job_id))
        return None if entry is None else _parse(entry.value)

    async def require(self, job_id: str) -> jobs_pb2.Job:
        job = await self.get(job_id)
        if job is None:
            raise NotFound(f"job {job_id!r}: no such job (unknown, or its result expired)")
        return job

    async def list(self, states: frozenset[int] = frozenset(), limit: int = 1000) -> list[jobs_pb2.Job]:
        """Records, oldest submitted first, optionally only in `states`; at most `limit`."""
        import nats.js.errors

        with queue_errors("list jobs"):
            try:
                keys = await self.kv.keys()
            except nats.js.errors.NoKeysError:
                return []
            jobs = []
            for key in sorted(set(keys)):  # a key updated while they are listed comes twice
                entry = await self._entry(key)
                if entry is not None and (job := _parse(entry.value)) and (not states or job.state in states):
                    jobs.append(job)
        jobs.sort(key=lambda j: j.submitted_at)
        return jobs[:limit]

    async def watch(self, job_id: str, until: float) -> AsyncIterator[jobs_pb2.Job]:
        """The record now, then each change of it, until it is final or `until` (monotonic) passes."""
        import nats.errors

        with queue_errors(f"watch {job_id}"):
            watcher = await self.kv.watch(check_job_id(job_id))
        try:
            while (left := until - time.monotonic()) > 0:
                with queue_errors(f"watch {job_id}"):
                    try:
                        entry = await watcher.updates(timeout=min(left, 5.0))
                    except nats.errors.TimeoutError:  # no change yet
                        continue
                if entry is None or not entry.value:  # the initial "nothing pending" marker, deletes
                    continue
                job = _parse(entry.value)
                yield job
                if job.state in FINAL:
                    return
        finally:
            with contextlib.suppress(Exception):
                await watcher.stop()

    async def history(self, job_id: str) -> builtins.list[jobs_pb2.Job]:
        """The record's kept revisions, oldest first, read straight from the bucket's stream (tests
        count the results stored with it)."""
        import nats.js.errors

        stream, subject = f"KV_{self.config.bucket}", f"$KV.{self.config.bucket}.{check_job_id(job_id)}"
        revisions: builtins.list[jobs_pb2.Job] = []
        seq = 1
        with queue_errors(f"read {job_id}"):
            while True:
                try:
                    raw = await self.js.get_msg(stream, seq=seq, subject=subject, next=True)
                except nats.js.errors.NotFoundError:
                    return revisions
                if raw.data:
                    revisions.append(_parse(raw.data))
                seq = (raw.seq or seq) + 1

    # -- a worker's run -------------------------------------------------------------------------

    async def claim(self, job_id: str, kind: str, attempt: int, submitted_at: float, trace_id: str) -> Claim | None:
        """Mark the job RUNNING for this delivery; None when it is final already (nothing to do)."""
        entry = await self._entry(job_id)
        if entry is None:  # the submitter stopped between publish and record: the message is the truth
            job = jobs_pb2.Job(job_id=job_id, kind=kind, submitted_at=submitted_at, trace_id=trace_id)
            revision = 0
        else:
            job, revision = _parse(entry.value), entry.revision
            if job.state in FINAL:
                return None
        job.state, job.attempts, job.updated_at = jobs_pb2.JOB_STATE_RUNNING, attempt, time.time()
        claim = await self._swap(job, revision)
        if claim is None:
            raise NotReady(f"job {job_id}: its record changed while claiming it; try again later")
        return claim

    async def finish(self, claim: Claim, update: jobs_pb2.Job) -> bool:
        """Store the run's outcome iff the record is still the one this run wrote; False if someone
        else moved it (another run stored first: this one's outcome is dropped)."""
        update.updated_at = time.time()
        return await self._swap(update, claim.revision) is not None

    async def dead_letter(self, claim: Claim, request_data: bytes, error: str) -> bool:
        """Park the job's request on its dead-letter subject, then mark the record DEAD_LETTERED."""
        job = _copy(claim.job)
        job.state, job.error = jobs_pb2.JOB_STATE_DEAD_LETTERED, error
        with queue_errors(f"dead-letter {job.job_id}"):
            await self.js.publish(self.config.dead_subject(job.job_id), request_data, stream=self.config.dead_stream,
                                  headers={"Nats-Msg-Id": f"{job.job_id}-dead-{claim.revision}",
                                           ERROR_HEADER: error[:1000].replace("\n", " ")})  # fmt: skip
        return await self.finish(claim, job)

    async def requeue(self, job_id: str) -> jobs_pb2.Job:
        """A dead-lettered job queued again with fresh attempts; its dead letter is removed."""
        import nats.js.errors

        entry = await self._entry(check_job_id(job_id))
        if entry is None or _parse(entry.value).state != jobs_pb2.JOB_STATE_DEAD_LETTERED:
            raise NotFound(f"job {job_id!r} is not dead-lettered")
        job = _parse(entry.value)
        with queue_errors(f"requeue {job_id}"):
            try:
                raw = await self.js.get_msg(self.config.dead_stream, subject=self.config.dead_subject(job_id))
            except nats.js.errors.NotFoundError as exc:
                raise NotFound(f"job {job_id!r}: its dead letter is gone") from exc
            job.state, job.attempts, job.error, job.updated_at = jobs_pb2.JOB_STATE_QUEUED, 0, "", time.time()
            if await self._swap(job, entry.revision) is None:
                raise NotFound(f"job {job_id!r} changed while being requeued; look again")
            await self.js.publish(self.config.subject(job.kind or "search"), raw.data or b"",
                                  stream=self.config.stream,
                                  headers={"Nats-Msg-Id": f"{job_id}-requeue-{raw.seq}",
                                           SUBMITTED_HEADER: repr(job.submitted_at)})  # fmt: skip
            await self.js.purge_stream(self.config.dead_stream, subject=self.config.dead_subject(job_id))
        return job

    async def depth(self) -> Depth:
        """Jobs waiting or in hand, the age of the oldest, and parked dead letters."""
        with queue_errors("read the queue depth"):
            info = await self.js.stream_info(self.config.stream)
            dead = await self.js.stream_info(self.config.dead_stream)
            age = 0.0
            if info.state.messages:
                try:
                    first = await self.js.get_msg(self.config.stream, seq=info.state.first_seq)
                    age = max(0.0, time.time() - float((first.headers or {}).get(SUBMITTED_HEADER, time.time())))
                except Exception:  # noqa: BLE001 - taken by a worker meanwhile: age unknown this time
                    age = 0.0
        return Depth(info.state.messages, age, dead.state.messages)

    # -- records ------------------------------------------------------------------------------

    async def _entry(self, key: str) -> Any:
        import nats.js.errors

        with queue_errors(f"read {key}"):
            try:
                return await self.kv.get(key)
            except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
                return None

    async def _create(self, job: jobs_pb2.Job) -> None:
        import nats.js.errors

        with contextlib.suppress(nats.js.errors.KeyWrongLastSequenceError):
            await self.kv.create(job.job_id, job.SerializeToString())

    async def _swap(self, job: jobs_pb2.Job, revision: int) -> Claim | None:
        """Write `job` iff the record is at `revision` (0: absent); the new claim, or None."""
        import nats.js.errors

        with queue_errors(f"store {job.job_id}"):
            try:
                if revision == 0:
                    new = await self.kv.create(job.job_id, job.SerializeToString())
                else:
                    new = await self.kv.update(job.job_id, job.SerializeToString(), last=revision)
            except nats.js.errors.KeyWrongLastSequenceError:
                return None
        return Claim(job, new)


def _parse(data: bytes | None) -> jobs_pb2.Job:
    job = jobs_pb2.Job()
    job.ParseFromString(data or b"")
    return job


def _copy(job: jobs_pb2.Job) -> jobs_pb2.Job:
    out = jobs_pb2.Job()
    out.CopyFrom(job)
    return out


def _with_id(request: jobs_pb2.SubmitJobRequest, job_id: str) -> jobs_pb2.SubmitJobRequest:
    out = jobs_pb2.SubmitJobRequest()
    out.CopyFrom(request)
    out.job_id = job_id
    return out


def _trace_id(headers: Mapping[str, str]) -> str:
    parts = dict(headers).get("traceparent", "").split("-")
    return parts[1] if len(parts) == 4 else ""
