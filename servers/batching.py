"""Dynamic batching and admission: merge concurrent requests, run the model off the event loop.

No protobuf here: requests are dicts of numpy arrays / byte lists, deadlines are monotonic times.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from meshserve.errors import DeadlineExpired, NotReady, Overloaded
from meshserve.servers.model import Model
from meshserve.wire.signature import Arrays, Params, rows

log = logging.getLogger(__name__)

Check = Callable[[Arrays, Params], None]  # Model.check: raises to refuse one request


@dataclass(frozen=True)
class BatchingConfig:
    """How requests are merged and how much work may wait."""

    max_batch_size: int = 8  # rows per model call; 1 turns batching off
    # How long the first request of a batch may wait for company. 0 still batches: whatever
    # queued up while the model was busy is merged, and an idle model never waits.
    max_queue_delay_ms: float = 0.0
    max_inflight: int = 64  # requests admitted at once (queued + running); beyond → Overloaded
    workers: int = 1  # model calls that may run at the same time (threads in the executor)

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        if self.max_queue_delay_ms < 0:
            raise ValueError("max_queue_delay_ms must be >= 0")
        if self.max_inflight < 1:
            raise ValueError("max_inflight must be >= 1")
        if self.workers < 1:
            raise ValueError("workers must be >= 1")


class BatchObserver:
    """Hooks the batcher calls; the metrics module implements them. Defaults do nothing."""

    def batch_ran(self, size: int, requests: int, seconds: float) -> None:
        pass

    def queued(self, seconds: float) -> None:
        pass

    def dropped_expired(self, count: int) -> None:
        pass


class Admission:
    """Counts admitted requests; refuses at once beyond the bound (no waiting, no queue).
    Only the event loop touches it, so a plain counter is enough."""

    __slots__ = ("limit", "count")

    def __init__(self, limit: int):
        self.limit = limit
        self.count = 0

    def acquire(self) -> None:
        if self.count >= self.limit:
            raise Overloaded(f"server busy: {self.count} requests in flight (limit {self.limit})")
        self.count += 1

    def release(self) -> None:
        self.count -= 1


class ModelThreads:
    """The threads model calls run on, fed by one queue; each call completes an asyncio future.

    Cheaper than ThreadPoolExecutor + asyncio.wrap_future (two chained futures and their
    callbacks per call): one queue put to wake a thread, one call_soon_threadsafe to come back.
    """

    def __init__(self, count: int, name: str = "model"):
        self._count = count
        self._name = name
        self._jobs: queue.SimpleQueue[tuple[Any, ...] | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []

    def submit(
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        future: asyncio.Future[Any],
        done: Callable[[asyncio.Future[Any], Any, BaseException | None], None],
    ) -> None:
        """Run `fn(*args)` on a model thread, then `done(future, result, error)` on the loop.
        A future already cancelled when its turn comes is not run (done still is)."""
        if not self._threads:
            self._start()
        self._jobs.put((future.get_loop(), fn, args, future, done))

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run `fn(*args)` on a model thread and wait for it (load, warmup, batches)."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.submit(fn, args, future, _settle)
        return await future

    def shutdown(self) -> None:
        """Let the threads finish what they run and stop them (blocks until they have)."""
        for _ in self._threads:
            self._jobs.put(None)
        for thread in self._threads:
            thread.join()
        self._threads = []

    def _start(self) -> None:
        for i in range(self._count):
            thread = threading.Thread(target=self._work, name=f"{self._name}_{i}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def _work(self) -> None:
        jobs = self._jobs
        while (job := jobs.get()) is not None:
            loop, fn, args, future, done = job
            result: Any = None
            error: BaseException | None = None
            if not future.cancelled():
                try:
                    result = fn(*args)
                except BaseException as exc:  # handed to the caller, like an executor does
                    error = exc
            try:
                loop.call_soon_threadsafe(done, future, result, error)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                pass
            del job, future, result, error  # drop references before sleeping on the queue


def _checked(check: Check, predict: Callable[[Arrays, Params], Arrays], inputs: Arrays, params: Params) -> Arrays:
    check(inputs, params)
    return predict(inputs, params)


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class _Item:
    __slots__ = ("inputs", "params", "size", "key", "deadline", "enqueued", "future")

    def __init__(
        self,
        inputs: Arrays,
        params: Params,
        size: int,
        key: Any,
        deadline: float | None,
        future: asyncio.Future[Arrays],
    ):
        self.inputs = inputs
        self.params = params
        self.size = size
        self.key = key
        self.deadline = deadline
        self.enqueued = time.monotonic()
        self.future = future


class Batcher:
    """Queues validated requests and runs them through the model in merged batches."""

    def __init__(
        self,
        model: Model,
        config: BatchingConfig,
        observer: BatchObserver | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.model = model
        self.config = config
        self.observer = observer or BatchObserver()
        self._clock = clock
        self._queue: collections.deque[_Item] = collections.deque()
        self._wakeup = asyncio.Event()
        self._threads = ModelThreads(config.workers)
        self._slots = asyncio.Semaphore(config.workers)
        self._running: set[asyncio.Task[None]] = set()
        self._loop_task: asyncio.Task[None] | None = None
        self._closed = False
        # with no queue delay an idle model takes a request straight away
        self._dispatch_now = config.max_batch_size == 1 or config.max_queue_delay_ms == 0
        self._inline = bool(model.runs_inline)  # see Model.runs_inline

    # -- lifecycle -------------------------------------------------------------------------

    async def run_on_model_thread(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the model thread(s) (load, warmup)."""
        return await self._threads.run(fn)

    def start(self) -> None:
        self._loop_task = asyncio.create_task(self._dispatch_loop(), name="batcher")

    async def close(self) -> None:
        """Stop taking work, fail what is still queued, wait for running batches."""
        self._closed = True
        while self._queue:
            item = self._queue.popleft()
            if not item.future.done():
                item.future.set_exception(NotReady("server is shutting down"))
        if self._loop_task is not None:
            self._loop_task.cancel()
            try:
                await self._loop_task
            except asyncio.CancelledError:
                pass
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)
        self._threads.shutdown()

    # -- the request side ------------------------------------------------------------------

    async def submit(self, inputs: Arrays, params: Params, deadline: float | None,
                     check: Check | None = None) -> Arrays:  # fmt: skip
        """Queue one validated request and wait for its outputs. `deadline` is monotonic time.

        `check(inputs, params)` is the model's per-request check that costs enough to be kept off
        the event loop (decoding an image): on an idle model it runs on the model thread right
        before predict, one hop for both; otherwise on the loop's executor before queueing, so a
        request that fails it never joins a batch.
        """
        if self._closed:
            raise NotReady("server is shutting down")
        if deadline is not None and self._clock() >= deadline:
            self.observer.dropped_expired(1)
            raise DeadlineExpired("deadline expired before the request was queued")
        size = rows(next(iter(inputs.values())))
        if check is not None and not self._idle():
            await asyncio.get_running_loop().run_in_executor(None, check, inputs, params)
            check = None
        if self._idle():
            # Idle model, nobody waiting: run at once, without a trip through the dispatcher.
            if self._inline and check is None:
                return self._run_inline(inputs, params, size)
            await self._slots.acquire()  # does not block: a slot is free
            return await self._run_direct(inputs, params, size, check)
        future: asyncio.Future[Arrays] = asyncio.get_running_loop().create_future()
        key = self.model.batch_key(inputs, params) if self.config.max_batch_size > 1 else None
        self._queue.append(_Item(inputs, params, size, key, deadline, future))
        self._wakeup.set()
        return await future

    async def run_call(self, call: Callable[[], Any], size: int, deadline: float | None) -> Any:
        """One model call that is not batched with others (a grouped shard search): on the event loop
        when the model runs inline and is idle, else on a model thread once a worker is free."""
        if self._closed:
            raise NotReady("server is shutting down")
        if deadline is not None and self._clock() >= deadline:
            self.observer.dropped_expired(1)
            raise DeadlineExpired("deadline expired before the request was queued")
        if self._inline and self._idle():
            self.observer.queued(0.0)
            started = time.perf_counter()
            result = call()
            self.observer.batch_ran(size, 1, time.perf_counter() - started)
            return result
        enqueued = self._clock()
        async with self._slots:
            if deadline is not None and self._clock() >= deadline:
                self.observer.dropped_expired(1)
                raise DeadlineExpired("deadline expired while queued")
            self.observer.queued(self._clock() - enqueued)
            started = time.perf_counter()
            result = await self._threads.run(call)
            self.observer.batch_ran(size, 1, time.perf_counter() - started)
            return result

    def _idle(self) -> bool:
        return not self._queue and not self._slots.locked() and self._dispatch_now

    # -- the dispatch side -----------------------------------------------------------------

    async def _dispatch_loop(self) -> None:
        delay = self.config.max_queue_delay_ms / 1000.0
        max_rows = self.config.max_batch_size
        while True:
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            await self._slots.acquire()  # a worker is free: only now form the batch
            if max_rows > 1 and delay > 0:
                await self._wait_for_company(self._queue[0].enqueued + delay, max_rows)
            batch = self._take_batch(max_rows)
            if not batch:
                self._slots.release()
                continue
            task = asyncio.create_task(self._run(batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _wait_for_company(self, until: float, max_rows: int) -> None:
        """Wait until the queue holds a full batch or the first item has waited long enough."""
        while sum(item.size for item in self._queue) < max_rows:
            remaining = until - self._clock()
            if remaining <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except TimeoutError:
                return

    def _take_batch(self, max_rows: int) -> list[_Item]:
        """Pop the first live item and every queued item compatible with it, up to max_rows."""
        now = self._clock()
        expired = 0
        batch: list[_Item] = []
        total = 0
        key: Any = None
        kept: collections.deque[_Item] = collections.deque()
        while self._queue:
            item = self._queue.popleft()
            if item.future.done():  # the caller went away (cancelled): never compute it
                expired += 1
                continue
            if item.deadline is not None and now >= item.deadline:
                item.future.set_exception(DeadlineExpired("deadline expired while queued"))
                expired += 1
                continue
            if not batch:
                batch.append(item)
                total, key = item.size, item.key
                if total >= max_rows:
                    break
            elif item.key == key and total + item.size <= max_rows:
                batch.append(item)
                total += item.size
                if total >= max_rows:
                    break
            else:
                kept.append(item)
        kept.extend(self._queue)
        self._queue = kept
        if expired:
            self.observer.dropped_expired(expired)
        return batch

    async def _run_direct(self, inputs: Arrays, params: Params, size: int, check: Check | None = None) -> Arrays:
        """One request on an idle model: no queue, no task, one hop to the model thread."""
        self.observer.queued(0.0)
        started = time.perf_counter()
        future: asyncio.Future[Arrays] = asyncio.get_running_loop().create_future()
        # If the caller goes away, its slot stays taken until the model thread is done with
        # the call (or has skipped it, when the cancel came first): _direct_done releases it.
        if check is None:
            self._threads.submit(self.model.predict, (inputs, params), future, self._direct_done)
        else:
            self._threads.submit(_checked, (check, self.model.predict, inputs, params), future, self._direct_done)
        outputs = await future
        self.observer.batch_ran(size, 1, time.perf_counter() - started)
        return outputs

    def _run_inline(self, inputs: Arrays, params: Params, size: int) -> Arrays:
        """One request on an idle model whose predict is trivially cheap: on the event loop."""
        self.observer.queued(0.0)
        started = time.perf_counter()
        outputs = self.model.predict(inputs, params)
        self.observer.batch_ran(size, 1, time.perf_counter() - started)
        return outputs

    def _direct_done(self, future: asyncio.Future[Arrays], outputs: Any, error: BaseException | None) -> None:
        self._slots.release()
        _settle(future, outputs, error)

    async def _run(self, batch: list[_Item]) -> None:
        try:
            now = self._clock()
            for item in batch:
                self.observer.queued(now - item.enqueued)
            sizes = [item.size for item in batch]
            started = time.perf_counter()
            try:
                outputs = await self._threads.run(self._call_model, batch, sizes)
            except Exception as exc:  # the model failed: every caller of this batch gets it
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(exc)
                return
            self.observer.batch_ran(sum(sizes), len(batch), time.perf_counter() - started)
            for item, out in zip(batch, outputs, strict=True):
                if not item.future.done():
                    item.future.set_result(out)
        finally:
            self._slots.release()

    def _call_model(self, batch: list[_Item], sizes: list[int]) -> list[Arrays]:
        model = self.model
        first = batch[0]
        if len(batch) == 1:
            return [model.predict(first.inputs, first.params)]
        merged = model.batch([item.inputs for item in batch])
        outputs = model.predict(merged, first.params)
        return model.unbatch(outputs, sizes)
