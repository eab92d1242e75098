"""The batching core on its own: merging, limits, deadlines and admission (no gRPC)."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from meshserve.errors import DeadlineExpired, NotReady, Overloaded
from meshserve.servers.batching import Admission, Batcher, BatchingConfig, BatchObserver, ModelThreads
from meshserve.servers.model import Model
from meshserve.wire.signature import Arrays, Params, Signature, TensorSpec


class Recording(Model):
    """Doubles x; records the batch sizes it was called with (and from which thread)."""

    name, version, role = "rec", "1", "test"
    signature = Signature(
        inputs=(TensorSpec("x", "float32", (-1, -1)),), outputs=(TensorSpec("y", "float32", (-1, -1)),)
    )

    def __init__(self, cost_s: float = 0.0, fail: bool = False):
        self.calls: list[int] = []
        self.threads: set[int] = set()
        self.cost_s = cost_s
        self.fail = fail
        self.running = 0
        self.most_at_once = 0

    def load(self) -> None:
        pass

    def predict(self, inputs: Arrays, params: Params) -> Arrays:
        x = inputs["x"]
        assert isinstance(x, np.ndarray)
        self.calls.append(len(x))
        self.threads.add(threading.get_ident())
        self.running += 1
        self.most_at_once = max(self.most_at_once, self.running)
        if self.cost_s:
            time.sleep(self.cost_s)
        self.running -= 1
        if self.fail:
            raise RuntimeError("model blew up")
        return {"y": x * 2}


class Counts(BatchObserver):
    def __init__(self) -> None:
        self.dropped = 0
        self.batches: list[tuple[int, int]] = []

    def dropped_expired(self, count: int) -> None:
        self.dropped += count

    def batch_ran(self, size: int, requests: int, seconds: float) -> None:
        self.batches.append((size, requests))


def _x(value: float, rows: int = 1, cols: int = 3) -> dict[str, np.ndarray]:
    return {"x": np.full((rows, cols), value, np.float32)}


async def _with_batcher(model: Model, config: BatchingConfig, observer=None):
    batcher = Batcher(model, config, observer)
    batcher.start()
    return batcher


async def test_concurrent_requests_merge_and_each_gets_its_own_rows() -> None:
    model = Recording(cost_s=0.05)
    batcher = await _with_batcher(model, BatchingConfig(max_batch_size=8, max_queue_delay_ms=20))
    try:
        outs = await asyncio.gather(*(batcher.submit(_x(i, rows=2), {}, None) for i in range(4)))
    finally:
        await batcher.close()
    assert model.calls == [8]  # 4 requests × 2 rows, one model call
    for i, out in enumerate(outs):
        np.testing.assert_array_equal(out["y"], np.full((2, 3), 2 * i, np.float32))
    assert threading.get_ident() not in model.threads  # off the event loop


async def test_batches_never_exceed_max_rows_and_batching_off_means_one_per_call() -> None:
    model = Recording()
    batcher = await _with_batcher(model, BatchingConfig(max_batch_size=4, max_queue_delay_ms=20))
    try:
        await asyncio.gather(*(batcher.submit(_x(i, rows=3), {}, None) for i in range(5)))
    finally:
        await batcher.close()
    assert all(rows <= 4 for rows in model.calls) and sum(model.calls) == 15

    model = Recording()
    batcher = await _with_batcher(model, BatchingConfig(max_batch_size=1))
    try:
        await asyncio.gather(*(batcher.submit(_x(i), {}, None) for i in range(5)))
    finally:
        await batcher.close()
    assert model.calls == [1] * 5


async def test_without_queue_delay_an_idle_model_never_waits_but_a_busy_one_batches() -> None:
    model = Recording(cost_s=0.1)
    batcher = await _with_batcher(model, BatchingConfig(max_batch_size=8, max_queue_delay_ms=0))
    try:
        await batcher.submit(_x(0), {}, None)  # alone, and not held back waiting for company
        first = asyncio.ensure_future(batcher.submit(_x(1), {}, None))
        await asyncio.sleep(0.02)  # first is running; the next four queue up behind it
        await asyncio.gather(first, *(batcher.submit(_x(i), {}, None) for i in range(4)))
    finally:
        await batcher.close()
    assert model.calls == [1, 1, 4]


async def test_incompatible_requests_are_not_merged() -> None:
    model = Recording()
    batcher = await _with_batcher(model, BatchingConfig(max_batch_size=16, max_queue_delay_ms=20))
    try:
        outs = await asyncio.gather(
            batcher.submit(_x(1, cols=3), {}, None),
            batcher.submit(_x(2, cols=5), {}, None),  # other width: cannot be concatenated
            batcher.submit(_x(3, cols=3), {}, None),
            batcher.submit(_x(4, cols=3), {"k": 2}, None),  # other parameters
        )
    finally:
        await batcher.close()
    assert sorted(model.calls) == [1, 1, 2]
    assert [o["y"].shape[1] for o in outs] == [3, 5, 3, 3]
    assert float(outs[1]["y"][0, 0]) == 4.0


async def test_expired_work_is_dropped_and_never_computed() -> None:
    model = Recording(cost_s=0.2)
    counts = Counts()
    batcher = await _with_batcher(model, BatchingConfig(max_batch_size=1), counts)
    try:
        with pytest.raises(DeadlineExpired, match="before the request was queued"):
            await batcher.submit(_x(0), {}, time.monotonic() - 0.001)
        busy = asyncio.ensure_future(batcher.submit(_x(1), {}, None))
        await asyncio.sleep(0.02)  # busy is running now; the next ones wait behind it
        # a caller that goes away (cancelled) while queued is not computed
        gone = asyncio.ensure_future(batcher.submit(_x(3), {}, None))
        await asyncio.sleep(0.01)
        gone.cancel()
        with pytest.raises(DeadlineExpired, match="while queued"):
            await batcher.submit(_x(2), {}, time.monotonic() + 0.05)
        await busy
        await batcher.submit(_x(4), {}, None)
    finally:
        await batcher.close()
    assert model.calls == [1, 1]  # only busy and the last one
    assert counts.dropped == 3


async def test_a_cancelled_caller_keeps_its_worker_busy_until_the_model_returns() -> None:
    model = Recording(cost_s=0.2)
    batcher = await _with_batcher(model, BatchingConfig(max_batch_size=1, workers=1))
    try:
        first = asyncio.ensure_future(batcher.submit(_x(1), {}, None))
        await asyncio.sleep(0.05)  # the model is running it
        first.cancel()
        # the worker is still busy: this one queues, and expires there uncomputed
        with pytest.raises(DeadlineExpired, match="while queued"):
            await batcher.submit(_x(2), {}, time.monotonic() + 0.05)
        out = await batcher.submit(_x(3), {}, None)
    finally:
        await batcher.close()
    assert first.cancelled()
    assert float(out["y"][0, 0]) == 6.0
    assert model.calls == [1, 1] and model.most_at_once == 1


async def test_a_call_cancelled_before_its_turn_is_skipped_but_still_reported_done() -> None:
    threads = ModelThreads(1)
    gate = threading.Event()
    ran: list[str] = []
    done: list[tuple[str, object]] = []
    loop = asyncio.get_running_loop()

    def record(name: str):
        def on_done(future: asyncio.Future, result: object, error: BaseException | None) -> None:
            done.append((name, result))
            if not future.cancelled():
                future.set_result(result)

        return on_done

    def work(name: str) -> str:
        gate.wait(5)
        ran.append(name)
        return name

    busy, skipped = loop.create_future(), loop.create_future()
    threads.submit(work, ("busy",), busy, record("busy"))
    threads.submit(work, ("skipped",), skipped, record("skipped"))
    skipped.cancel()
    gate.set()
    assert await busy == "busy"
    while len(done) < 2:
        await asyncio.sleep(0.01)
    threads.shutdown()
    assert ran == ["busy"] and done == [("busy", "busy"), ("skipped", None)]


class Inline(Recording):
    runs_inline = True


async def test_an_inline_model_runs_on_the_loop_when_idle_and_in_threads_when_batching() -> None:
    model = Inline()
    counts = Counts()
    batcher = await _with_batcher(model, BatchingConfig(max_batch_size=8), counts)
    try:
        out = await batcher.submit(_x(2), {}, None)
        with pytest.raises(DeadlineExpired, match="before the request was queued"):
            await batcher.submit(_x(0), {}, time.monotonic() - 0.001)
    finally:
        await batcher.close()
    assert float(out["y"][0, 0]) == 4.0
    assert model.threads == {threading.get_ident()} and counts.batches == [(1, 1)]

    model = Inline()
    batcher = await _with_batcher(model, BatchingConfig(max_batch_size=8, max_queue_delay_ms=20))
    try:
        await asyncio.gather(*(batcher.submit(_x(i), {}, None) for i in range(3)))
    finally:
        await batcher.close()
    assert model.calls == [3] and threading.get_ident() not in model.threads


async def test_a_check_runs_with_predict_on_an_idle_model_and_before_queueing_on_a_busy_one() -> None:
    from meshserve.errors import InvalidInput

    model = Recording(cost_s=0.1)
    checked: list[tuple[float, int]] = []  # (value, thread)

    def check(inputs: Arrays, params: Params) -> None:
        value = float(inputs["x"][0, 0])  # type: ignore[index]
        checked.append((value, threading.get_ident()))
        if value < 0:
            raise InvalidInput("negative")

    batcher = await _with_batcher(model, BatchingConfig(max_batch_size=8, max_queue_delay_ms=0))
    try:
        await batcher.submit(_x(0), {}, None, check=check)  # idle: one hop, check then predict
        busy = asyncio.ensure_future(batcher.submit(_x(1), {}, None, check=check))
        await asyncio.sleep(0.03)  # the model runs `busy`: the next ones are checked, then queued
        outs = await asyncio.gather(busy, *(batcher.submit(_x(v), {}, None, check=check) for v in (2, -1, 3)),
                                    return_exceptions=True)  # fmt: skip
    finally:
        await batcher.close()
    model_thread = model.threads.copy()
    assert len(model_thread) == 1 and checked[0][1] in model_thread and checked[1][1] in model_thread
    assert all(thread not in model_thread for _, thread in checked[2:])  # busy model: the executor
    assert isinstance(outs[2], InvalidInput) and [float(o["y"][0, 0]) for o in (outs[0], outs[1], outs[3])] == [2, 4, 6]
    assert model.calls == [1, 1, 2]  # the refused request never joined the batch


async def test_model_failure_reaches_every_caller_of_the_batch() -> None:
    model = Recording(fail=True)
    batcher = await _with_batcher(model, BatchingConfig(max_batch_size=4, max_queue_delay_ms=20))
    try:
        results = await asyncio.gather(
            *(batcher.submit(_x(i), {}, None) for i in range(3)), return_exceptions=True
        )
    finally:
        await batcher.close()
    assert all(isinstance(r, RuntimeError) for r in results)


async def test_closed_batcher_refuses() -> None:
    batcher = await _with_batcher(Recording(), BatchingConfig())
    await batcher.close()
    with pytest.raises(NotReady):
        await batcher.submit(_x(0), {}, None)


def test_admission_refuses_beyond_the_limit_at_once() -> None:
    admission = Admission(2)
    admission.acquire()
    admission.acquire()
    with pytest.raises(Overloaded, match="limit 2"):
        admission.acquire()
    admission.release()
    admission.acquire()
    assert admission.count == 2


def test_config_is_checked() -> None:
    for bad in ({"max_batch_size": 0}, {"max_inflight": 0}, {"max_queue_delay_ms": -1}):
        with pytest.raises(ValueError):
            BatchingConfig(**bad)
