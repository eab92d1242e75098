"""Asynchronous jobs with real processes: dev registry, NATS JetStream (`meshserve nats dev`), a model
mesh over tiny trained models, the gateway's Jobs service and `meshserve worker` processes. In order:
a job runs end to end in one trace; bad input is refused at Submit like the synchronous call; then
the faults of issue 15 — a worker SIGKILLed mid-job, a poison job, the gateway restarted between
Submit and Get, a full stream, NATS killed and restarted with 200 jobs queued — lose nothing and
store no result twice."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from meshserve.local.demo import held_out_photos
from meshserve.local.mesh import LocalMesh, MeshConfig, MeshInfo
from meshserve.local.supervisor import Child, ChildSpec
from meshserve.queue.config import QueueConfig
from meshserve.queue.connect import connect
from meshserve.queue.store import FINAL, JobQueue
from meshserve.v1 import jobs_pb2, jobs_pb2_grpc, photo_search_pb2, photo_search_pb2_grpc
from tests.support import free_port, wait_until

pytestmark = pytest.mark.slow

MIN_SCORE = 0.01
MAX_JOBS = 260
MAX_DELIVERIES = 3
# Shared by the gateway, the workers and this test through the environment (QueueConfig.from_env).
QUEUE_ENV = {"MESHSERVE_JOBS_MAX_JOBS": str(MAX_JOBS), "MESHSERVE_JOBS_MAX_DELIVERIES": str(MAX_DELIVERIES),
             "MESHSERVE_JOBS_ACK_WAIT_S": "3", "MESHSERVE_JOBS_BACKOFF_S": "0.2,0.5,1",
             "MESHSERVE_JOBS_JOB_TIMEOUT_S": "20"}  # fmt: skip


class JobsMesh:
    def __init__(self, local: LocalMesh, info: MeshInfo):
        self.local, self.info = local, info
        self.nats_url = f"nats://{local.config.nats_addr}"
        self.workers: list[Child] = []

    @property
    def gateway(self) -> str:
        return self.info.gateway

    def child(self, name: str) -> Child:
        return next(c for c in self.local.supervisor.children if c.spec.name == name and c.alive)

    def start_worker(self, name: str, *args: str) -> Child:
        port_file = self.local.config.run_dir / "ports" / f"{name}.port"
        child = self.local.supervisor.start(ChildSpec(name, ("worker", "--port", str(free_port()), "--port-file",
                                                             str(port_file), *args), port_file=port_file))  # fmt: skip
        self.local.supervisor.wait_port(child, 60)
        self.workers.append(child)
        return child

    def stop_workers(self) -> None:
        for child in self.workers:
            if child.alive:
                child.proc.send_signal(signal.SIGTERM)
        for child in self.workers:
            child.proc.wait(timeout=40)
        self.workers.clear()

    def queue(self, action: Callable[[JobQueue], object]) -> object:
        """Run `await action(queue)` on a fresh connection to the mesh's NATS."""

        async def go() -> object:
            nc = await connect(self.nats_url, "test")
            try:
                return await action(await JobQueue(nc, QueueConfig.from_env()).ensure())  # type: ignore[misc]
            finally:
                await nc.close()

        return asyncio.run(go())


@pytest.fixture(scope="module")
def mesh(home_copy: Callable[[], Path]) -> Iterator[JobsMesh]:
    home = home_copy()
    config = MeshConfig(home=home, registry_addr=f"127.0.0.1:{free_port()}", gateway_addr=f"127.0.0.1:{free_port()}",
                        detectors=1, embedders=1, shards=2, nats_addr=f"127.0.0.1:{free_port()}",
                        ready_timeout_s=240)  # fmt: skip
    with pytest.MonkeyPatch.context() as patch:
        for key, value in QUEUE_ENV.items():
            patch.setenv(key, value)
        local = LocalMesh(config, say=lambda line: None)
        try:
            yield JobsMesh(local, local.start())
        finally:
            local.stop()
            assert all(not c.alive for c in local.supervisor.children)


@pytest.fixture(scope="module")
def photos(mesh: JobsMesh) -> list[bytes]:
    return [p.jpeg for p in held_out_photos(mesh.local.config.home, 4)]


@pytest.fixture
def worker(mesh: JobsMesh) -> Iterator[Child]:
    """One worker for the test; every worker the test started is drained after it."""
    child = mesh.start_worker(f"worker-{time.monotonic_ns()}")
    yield child
    mesh.stop_workers()


def search_request(image: bytes, **kwargs: object) -> photo_search_pb2.SearchRequest:
    return photo_search_pb2.SearchRequest(image=image, min_detection_score=MIN_SCORE, **kwargs)  # type: ignore[arg-type]


def submit(mesh: JobsMesh, search: photo_search_pb2.SearchRequest, job_id: str = "") -> jobs_pb2.SubmitJobResponse:
    with grpc.insecure_channel(mesh.gateway) as channel:
        return jobs_pb2_grpc.JobsStub(channel).Submit(jobs_pb2.SubmitJobRequest(job_id=job_id, search=search),
                                                      timeout=10)  # fmt: skip


def get(mesh: JobsMesh, job_id: str) -> jobs_pb2.Job:
    with grpc.insecure_channel(mesh.gateway) as channel:
        return jobs_pb2_grpc.JobsStub(channel).Get(jobs_pb2.GetJobRequest(job_id=job_id), timeout=10)


def wait_state(mesh: JobsMesh, job_id: str, states: set[int], timeout: float = 90) -> jobs_pb2.Job:
    return wait_until(lambda: (job := get(mesh, job_id)).state in states and job, timeout=timeout, interval=0.1,
                      what=f"job {job_id} in {sorted(jobs_pb2.JobState.Name(s) for s in states)}")  # fmt: skip


def results_stored(mesh: JobsMesh, job_id: str) -> int:
    """How many revisions of the job's record carry a stored result (SUCCEEDED)."""
    history = mesh.queue(lambda q: q.history(job_id))
    return sum(1 for job in history if job.state == jobs_pb2.JOB_STATE_SUCCEEDED)  # type: ignore[attr-defined]


def meshserve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "meshserve.cli", *args], capture_output=True, text=True,
                          timeout=60, env={**os.environ, **QUEUE_ENV})  # fmt: skip


# -- end to end ---------------------------------------------------------------------------------


def test_a_search_job_gives_the_synchronous_answer_in_one_trace(mesh: JobsMesh, photos: list[bytes],
                                                               worker: Child) -> None:  # fmt: skip
    request = search_request(photos[0], top_k=5, no_cache=True)
    reply = submit(mesh, request, job_id="e2e-1")
    assert reply.job_id == "e2e-1" and reply.created
    assert not submit(mesh, request, job_id="e2e-1").created  # idempotent: known id, same job

    job = wait_state(mesh, "e2e-1", set(FINAL))
    assert job.state == jobs_pb2.JOB_STATE_SUCCEEDED, job.error
    assert job.kind == "search" and job.attempts == 1 and job.submitted_at <= job.updated_at
    with grpc.insecure_channel(mesh.gateway) as channel:
        sync = photo_search_pb2_grpc.PhotoSearchStub(channel).Search(request, timeout=10)
    assert [d.label for d in job.search.detections] == [d.label for d in sync.detections]
    assert [[m.item_id for m in d.matches] for d in job.search.detections] == \
        [[m.item_id for m in d.matches] for d in sync.detections]  # fmt: skip
    assert job.search.detections and job.search.coverage.shards_answered == 2
    assert results_stored(mesh, "e2e-1") == 1

    # one trace: the gateway's Submit, the worker's run and the gateway's Search it made
    def spans() -> list[dict]:
        lines = mesh.local.trace_file.read_text().splitlines()
        return [s for s in map(json.loads, lines) if s["trace_id"] == job.trace_id]

    names = wait_until(lambda: {s["name"] for s in spans()} >= {"meshserve.v1.Jobs/Submit", "job search",
                                                               "meshserve.v1.PhotoSearch/Search"}
                       and {s["name"] for s in spans()}, timeout=30, what="submit, run and search in one trace")
    assert "detect" in names
    run = next(s for s in spans() if s["name"] == "job search")
    assert run["service"] == "meshserve-worker" and run["attributes"]["job.id"] == "e2e-1"

    shown = meshserve("jobs", "get", "e2e-1", "--gateway", mesh.gateway, "--json")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["state"] == "succeeded"


def test_the_jobs_commands_submit_wait_and_list(mesh: JobsMesh, photos: list[bytes], worker: Child,
                                                 tmp_path: Path) -> None:  # fmt: skip
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(photos[3])
    done = meshserve("jobs", "submit", "search", str(photo), "--min-score", str(MIN_SCORE), "--job-id", "cli-1",
                     "--wait", "--json", "--gateway", mesh.gateway)  # fmt: skip
    assert done.returncode == 0, done.stderr
    job = json.loads(done.stdout)
    assert job["job_id"] == "cli-1" and job["state"] == "succeeded" and job["search"]["detections"]
    listed = meshserve("jobs", "list", "--state", "succeeded", "--nats", mesh.nats_url, "--json")
    assert listed.returncode == 0, listed.stderr
    assert "cli-1" in {json.loads(line)["job_id"] for line in listed.stdout.splitlines()}
    missing = meshserve("jobs", "submit", "search", str(tmp_path / "nope.jpg"), "--gateway", mesh.gateway)
    assert missing.returncode == 2 and "cannot read" in missing.stderr
    bad = meshserve("jobs", "submit", "search", str(photo), "--top-k", "1000", "--gateway", mesh.gateway)
    assert bad.returncode == 1 and "INVALID_ARGUMENT" in bad.stderr and "top_k" in bad.stderr


def test_watch_streams_the_changes_of_a_job_until_it_is_final(mesh: JobsMesh, photos: list[bytes]) -> None:
    submit(mesh, search_request(photos[2], no_cache=True), job_id="watched")
    watcher = subprocess.Popen([sys.executable, "-m", "meshserve.cli", "jobs", "get", "watched", "--watch", "--json",
                                "--gateway", mesh.gateway], stdout=subprocess.PIPE, text=True,
                               env={**os.environ, **QUEUE_ENV})  # fmt: skip
    try:
        assert watcher.stdout is not None
        first = json.loads(watcher.stdout.readline())  # the job as it is: no worker yet
        assert first["state"] == "queued"
        mesh.start_worker(f"worker-w-{time.monotonic_ns()}")
        out, _ = watcher.communicate(timeout=90)  # ends by itself once the job is final
    finally:
        watcher.kill()
        mesh.stop_workers()
    states = [first["state"], *(json.loads(line)["state"] for line in out.splitlines())]
    assert watcher.returncode == 0 and states[-1] == "succeeded" and "running" in states, states
    with grpc.insecure_channel(mesh.gateway) as channel, pytest.raises(grpc.RpcError) as unknown:
        list(jobs_pb2_grpc.JobsStub(channel).Watch(jobs_pb2.GetJobRequest(job_id="no-such-job"), timeout=10))
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND


# -- bad input: the synchronous call's statuses, at once ------------------------------------------


@pytest.mark.parametrize(
    "image, top_k, words",
    [(b"", 0, "image: empty"), (b"definitely not an image", 0, "image"), (None, 101, "top_k")],
    ids=["empty", "not-an-image", "top_k-too-large"],
)
def test_bad_input_is_refused_at_submit_like_the_synchronous_call(
    mesh: JobsMesh, photos: list[bytes], image: bytes | None, top_k: int, words: str
) -> None:
    request = search_request(photos[0] if image is None else image, top_k=top_k)
    with pytest.raises(grpc.RpcError) as at_submit:
        submit(mesh, request, job_id="bad-input")
    with grpc.insecure_channel(mesh.gateway) as channel, pytest.raises(grpc.RpcError) as synchronous:
        photo_search_pb2_grpc.PhotoSearchStub(channel).Search(request, timeout=10)
    assert at_submit.value.code() == synchronous.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert words in at_submit.value.details() and at_submit.value.details() == synchronous.value.details()
    with pytest.raises(grpc.RpcError) as unknown:  # refused, so never queued
        get(mesh, "bad-input")
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND


def test_unknown_and_malformed_job_ids(mesh: JobsMesh, photos: list[bytes]) -> None:
    with pytest.raises(grpc.RpcError) as unknown:
        get(mesh, "no-such-job")
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND and "no-such-job" in unknown.value.details()
    for bad in ("a.b", "x" * 65, "white space"):
        with pytest.raises(grpc.RpcError) as malformed:
            submit(mesh, search_request(photos[0]), job_id=bad)
        assert malformed.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "job_id" in malformed.value.details()
    with grpc.insecure_channel(mesh.gateway) as channel, pytest.raises(grpc.RpcError) as empty:
        jobs_pb2_grpc.JobsStub(channel).Submit(jobs_pb2.SubmitJobRequest(job_id="nothing"), timeout=10)
    assert empty.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "payload" in empty.value.details()


# -- faults -------------------------------------------------------------------------------------


def poison(photo: bytes) -> bytes:
    """A photo whose header passes the gateway's checks but whose body the detector cannot decode:
    every run of it fails in the model server."""
    return photo[: len(photo) // 2]


def test_a_worker_killed_mid_job_loses_nothing_and_stores_one_result(mesh: JobsMesh, photos: list[bytes],
                                                                     worker: Child) -> None:  # fmt: skip
    detector = mesh.child("detector-0")
    detector.proc.send_signal(signal.SIGSTOP)  # the run hangs in the detector: the worker is mid-job
    try:
        submit(mesh, search_request(photos[1], no_cache=True), job_id="killed-mid-job")
        running = wait_state(mesh, "killed-mid-job", {jobs_pb2.JOB_STATE_RUNNING}, timeout=30)
        assert running.attempts == 1
        worker.proc.send_signal(signal.SIGKILL)
        worker.proc.wait(timeout=10)
    finally:
        detector.proc.send_signal(signal.SIGCONT)
    mesh.start_worker(f"worker-b-{time.monotonic_ns()}")
    job = wait_state(mesh, "killed-mid-job", set(FINAL))
    assert job.state == jobs_pb2.JOB_STATE_SUCCEEDED, job.error
    assert job.attempts >= 2  # redelivered to the second worker after the first died holding it
    assert job.search.coverage.shards_expected == 2
    assert results_stored(mesh, "killed-mid-job") == 1


def test_a_poison_job_is_dead_lettered_and_requeue_runs_it_again(mesh: JobsMesh, photos: list[bytes]) -> None:
    metrics_port = free_port()
    mesh.start_worker(f"worker-m-{time.monotonic_ns()}", "--metrics-port", str(metrics_port))
    try:
        poison_job_and_requeue(mesh, photos)
        wait_until(lambda: worker_metric(metrics_port, "meshserve_jobs_dead_letters") == 1, timeout=30,
                   what="the dead-letter gauge")  # fmt: skip
        assert worker_metric(metrics_port, "meshserve_jobs_runs_total", 'kind="search",outcome="dead_lettered"') == 2
        assert worker_metric(metrics_port, "meshserve_jobs_runs_total", 'kind="search",outcome="retried"') == \
            2 * (MAX_DELIVERIES - 1)  # fmt: skip
        assert worker_metric(metrics_port, "meshserve_jobs_attempts_count", 'kind="search"') >= 8
        assert worker_metric(metrics_port, "meshserve_jobs_queue_depth") == 0
    finally:
        mesh.stop_workers()


def worker_metric(port: int, name: str, labels: str = "") -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    prefix = f"{name}{{{labels}}} " if labels else f"{name} "
    return sum(float(line[len(prefix):]) for line in text.splitlines() if line.startswith(prefix))


def poison_job_and_requeue(mesh: JobsMesh, photos: list[bytes]) -> None:
    with grpc.insecure_channel(mesh.gateway) as channel, pytest.raises(grpc.RpcError) as synchronous:
        photo_search_pb2_grpc.PhotoSearchStub(channel).Search(search_request(poison(photos[2])), timeout=10)
    assert synchronous.value.code() != grpc.StatusCode.OK  # the model errors on it, every time
    submit(mesh, search_request(poison(photos[2]), no_cache=True), job_id="poison")
    good = [submit(mesh, search_request(photos[i % 4], no_cache=True)).job_id for i in range(6)]

    dead = wait_state(mesh, "poison", set(FINAL))
    assert dead.state == jobs_pb2.JOB_STATE_DEAD_LETTERED
    assert dead.attempts == MAX_DELIVERIES and synchronous.value.code().name in dead.error
    for job_id in good:
        assert wait_state(mesh, job_id, set(FINAL)).state == jobs_pb2.JOB_STATE_SUCCEEDED

    listed = meshserve("jobs", "dead-letter", "--nats", mesh.nats_url, "--json")
    assert listed.returncode == 0, listed.stderr
    parked = [json.loads(line) for line in listed.stdout.splitlines()]
    assert [(j["job_id"], j["state"]) for j in parked] == [("poison", "dead_lettered")] and parked[0]["error"]

    requeued = meshserve("jobs", "dead-letter", "--nats", mesh.nats_url, "--requeue", "poison")
    assert requeued.returncode == 0, requeued.stderr
    assert get(mesh, "poison").state in {jobs_pb2.JOB_STATE_QUEUED, jobs_pb2.JOB_STATE_RUNNING}
    again = wait_until(lambda: (j := get(mesh, "poison")).state == jobs_pb2.JOB_STATE_DEAD_LETTERED and j,
                       timeout=60, interval=0.1, what="the requeued poison job dead-lettered again")
    assert again.attempts == MAX_DELIVERIES and again.updated_at > dead.updated_at
    again_twice = meshserve("jobs", "dead-letter", "--nats", mesh.nats_url, "--requeue", "no-such-job")
    assert again_twice.returncode == 1 and "not dead-lettered" in again_twice.stderr


def test_a_drained_worker_hands_back_the_job_it_cannot_finish_in_its_grace(mesh: JobsMesh,
                                                                           photos: list[bytes]) -> None:
    worker = mesh.start_worker(f"worker-grace-{time.monotonic_ns()}", "--grace", "1")
    detector = mesh.child("detector-0")
    detector.proc.send_signal(signal.SIGSTOP)
    try:
        submit(mesh, search_request(photos[0], no_cache=True), job_id="handed-back")
        wait_state(mesh, "handed-back", {jobs_pb2.JOB_STATE_RUNNING}, timeout=30)
        began = time.monotonic()
        worker.proc.send_signal(signal.SIGTERM)
        assert worker.proc.wait(timeout=30) == 0
        assert time.monotonic() - began < 15  # the grace, then the job goes back: not the job's 20 s deadline
    finally:
        detector.proc.send_signal(signal.SIGCONT)
    mesh.start_worker(f"worker-next-{time.monotonic_ns()}")
    try:
        job = wait_state(mesh, "handed-back", set(FINAL))
    finally:
        mesh.stop_workers()
    assert job.state == jobs_pb2.JOB_STATE_SUCCEEDED and job.attempts >= 2
    assert results_stored(mesh, "handed-back") == 1


def test_a_check_job_gives_the_synchronous_listing_check(mesh: JobsMesh, worker: Child) -> None:
    """A `check` job runs through the gateway's ListingGuard/Check: its stored answer has the
    decision and the verdicts of the same listing checked synchronously; a listing the
    synchronous call refuses is refused at submit with the same field named."""
    from meshserve.v1 import listing_guard_pb2, listing_guard_pb2_grpc

    listing = listing_guard_pb2.Listing(listing_id="l-1", title="a lamp", description="brass, working",
                                        price_cents=1200, category="home")  # fmt: skip
    request = listing_guard_pb2.CheckRequest(listing=listing)
    with grpc.insecure_channel(mesh.gateway) as channel:
        stub = jobs_pb2_grpc.JobsStub(channel)
        stub.Submit(jobs_pb2.SubmitJobRequest(job_id="check-1", check=request), timeout=10)
        with pytest.raises(grpc.RpcError) as bad:
            stub.Submit(jobs_pb2.SubmitJobRequest(check=listing_guard_pb2.CheckRequest(
                listing=listing_guard_pb2.Listing(title="a lamp", price_cents=-5))), timeout=10)  # fmt: skip
        synchronous = listing_guard_pb2_grpc.ListingGuardStub(channel).Check(request, timeout=30)
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "price_cents" in bad.value.details()
    job = wait_state(mesh, "check-1", set(FINAL))
    assert job.kind == "check" and job.state == jobs_pb2.JOB_STATE_SUCCEEDED, job.error
    assert job.check.decision == synchronous.decision
    assert {(v.model, v.version, v.status) for v in job.check.verdicts} == {
        (v.model, v.version, v.status) for v in synchronous.verdicts}
    assert {v.model for v in job.check.verdicts} >= {"counterfeit", "prohibited", "contact_info"}


def test_a_message_that_is_no_job_is_dropped_once_and_blocks_nothing(mesh: JobsMesh, photos: list[bytes],
                                                                      worker: Child) -> None:  # fmt: skip
    config = QueueConfig.from_env()
    mesh.queue(lambda q: q.js.publish(config.subject("search"), b"\xff not a protobuf", stream=config.stream))
    submit(mesh, search_request(photos[1]), job_id="after-garbage")
    assert wait_state(mesh, "after-garbage", set(FINAL)).state == jobs_pb2.JOB_STATE_SUCCEEDED
    wait_until(lambda: mesh.queue(lambda q: q.depth()).queued == 0, timeout=30,  # type: ignore[attr-defined]
               what="the garbage message terminated, not redelivered")  # fmt: skip
    assert "is not a job" in Path(worker.log_path).read_text()


def test_get_answers_from_the_stored_state_after_the_gateway_restarts(mesh: JobsMesh, photos: list[bytes]) -> None:
    submit(mesh, search_request(photos[3]), job_id="across-restart")
    gateway = mesh.child("gateway")
    gateway.proc.send_signal(signal.SIGTERM)
    gateway.proc.wait(timeout=30)
    port_file = gateway.spec.port_file
    restarted = mesh.local.supervisor.start(gateway.spec)
    mesh.local.supervisor.wait_port(restarted, 60)
    assert port_file is not None
    job = wait_until(lambda: get(mesh, "across-restart"), timeout=30, what="Get on the restarted gateway")
    assert job.state == jobs_pb2.JOB_STATE_QUEUED and job.kind == "search"  # no worker yet: still queued
    mesh.start_worker(f"worker-c-{time.monotonic_ns()}")
    try:
        assert wait_state(mesh, "across-restart", set(FINAL)).state == jobs_pb2.JOB_STATE_SUCCEEDED
    finally:
        mesh.stop_workers()


def test_a_full_stream_answers_resource_exhausted_at_once_and_drops_nothing(mesh: JobsMesh,
                                                                            photos: list[bytes]) -> None:
    queued = mesh.queue(lambda q: q.depth()).queued  # type: ignore[attr-defined]
    accepted = []
    for i in range(MAX_JOBS - queued):
        accepted.append(submit(mesh, search_request(photos[i % 4]), job_id=f"full-{i}").job_id)
    began = time.monotonic()
    with pytest.raises(grpc.RpcError) as full:
        submit(mesh, search_request(photos[0]), job_id="one-too-many")
    assert full.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "full" in full.value.details()
    assert time.monotonic() - began < 2.0  # refused at once, not after waiting for room
    with pytest.raises(grpc.RpcError) as refused:
        get(mesh, "one-too-many")
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND  # refused means not queued, not dropped later
    # every accepted job is there; a worker empties the queue
    mesh.start_worker(f"worker-d-{time.monotonic_ns()}")
    try:
        wait_until(lambda: all(get(mesh, j).state in FINAL for j in accepted), timeout=240, interval=1,
                   what="every accepted job final")  # fmt: skip
    finally:
        mesh.stop_workers()
    assert all(get(mesh, j).state == jobs_pb2.JOB_STATE_SUCCEEDED for j in accepted)


def test_nats_killed_and_restarted_with_200_jobs_queued_loses_none_and_runs_none_twice(
    mesh: JobsMesh, photos: list[bytes]
) -> None:
    ids = [submit(mesh, search_request(photos[i % 4]), job_id=f"restart-{i}").job_id for i in range(200)]
    for name in ("worker-e", "worker-f"):
        mesh.start_worker(f"{name}-{time.monotonic_ns()}")
    try:
        # some done, most still queued: then NATS dies hard (its whole process group) and comes back
        wait_until(lambda: mesh.queue(lambda q: q.depth()).queued < 190, timeout=60, interval=0.2,  # type: ignore[attr-defined]
                   what="the workers under way")  # fmt: skip
        nats = mesh.child("nats")
        os.killpg(nats.proc.pid, signal.SIGKILL)
        nats.proc.wait(timeout=10)
        restarted = mesh.local.supervisor.start(nats.spec)
        host, _, port = mesh.local.config.nats_addr.rpartition(":")  # type: ignore[union-attr]
        wait_until(lambda: _accepts(host, int(port)), timeout=30, what="NATS back")
        assert restarted.alive

        def final_states() -> dict[int, int]:
            counts: dict[int, int] = {}
            for job in mesh.queue(lambda q: q.list(limit=10_000)):  # type: ignore[attr-defined]
                if job.job_id.startswith("restart-"):
                    counts[job.state] = counts.get(job.state, 0) + 1
            return counts

        states = wait_until(lambda: (c := final_states()).get(jobs_pb2.JOB_STATE_SUCCEEDED, 0) == 200 and c,
                            timeout=180, interval=1, what="all 200 jobs SUCCEEDED after the restart")
        assert states == {jobs_pb2.JOB_STATE_SUCCEEDED: 200}
    finally:
        mesh.stop_workers()
    twice = [j for j in ids if results_stored(mesh, j) != 1]
    assert not twice, f"jobs whose result was stored other than once: {twice[:5]}"
    assert mesh.queue(lambda q: q.depth()).queued == 0  # type: ignore[attr-defined]


def _accepts(host: str, port: int) -> bool:
    import socket

    try:
        socket.create_connection((host, port), timeout=1).close()
    except OSError:
        return False
    return True
