"""``DynamicBatcher``: requests that can share a pipeline call, gathered and denoised together.

Requests wait in one FIFO queue. A worker takes the oldest request and every later one with the same
:class:`~share_diffusers.serving.engine.BatchKey` (size, steps, guidance), up to ``max_batch`` images,
waiting at most ``max_wait_ms`` after the oldest arrived for more to come; then it runs the one
pipeline call in a single worker thread, so the event loop keeps answering (health checks, metrics,
new requests) while the batch computes. Requests that arrive during a computation are gathered for
the next one: under load, batches fill without waiting.

- The queue is bounded (``max_queue`` images waiting): :meth:`DynamicBatcher.submit` raises
  :class:`QueueFullError` at once rather than queueing without end (the API answers 503).
- A request cancelled while it waits (its client went away) leaves the queue and frees its slot;
  one cancelled during a computation lets the batch finish for everyone else and its images are dropped.
- Bank changes go through :meth:`DynamicBatcher.run_exclusive`, on the same worker thread: they wait
  for the running batch and run before the next, so a batch finishes with the bank it started with.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from .engine import ImageJob, JobResult, RequestError, ServingEngine
from .metrics import ServeMetrics

logger = logging.getLogger(__name__)


class QueueFullError(RuntimeError):
    """The queue holds ``max_queue`` images already; try again later (HTTP 503)."""


@dataclass
class BatchedResult:
    """A job's result and the seconds it waited in the queue before its pipeline call started."""

    result: JobResult
    queue_s: float


@dataclass(eq=False)
class _Entry:
    job: ImageJob
    future: asyncio.Future
    arrived: float = field(default_factory=time.perf_counter)


class DynamicBatcher:
    """Gather compatible requests into one pipeline call.

    Args:
        engine: validates nothing here (jobs come validated) but runs the calls.
        max_batch: most images in one pipeline call (a request of ``n`` images is never split).
        max_wait_ms: longest a request waits for others to join it once it is the oldest waiting.
        max_queue: most images waiting (not yet in a running call); more are refused.
        metrics: where batch sizes, latencies and the queue depth go (optional).

    Use it inside a running event loop: ``await batcher.start()``, then ``await batcher.submit(job)``
    from any number of tasks, ``await batcher.stop()`` at the end.
    """

    def __init__(
        self,
        engine: ServingEngine,
        max_batch: int = 8,
        max_wait_ms: float = 20.0,
        max_queue: int = 64,
        metrics: ServeMetrics | None = None,
    ):
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        if max_queue < max_batch:
            raise ValueError(f"max_queue ({max_queue}) must hold a whole batch (max_batch {max_batch})")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must not be negative, got {max_wait_ms}")
        self.engine = engine
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1e3
        self.max_queue = max_queue
        self.metrics = metrics
        self._pending: list[_Entry] = []
        self._wakeup: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None

    # -- life cycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        if self._worker is not None:
            return
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="share-pipeline")
        self._worker = asyncio.create_task(self._work(), name="share-batcher")

    async def stop(self) -> None:
        """Stop gathering; waiting requests fail with :class:`QueueFullError`; a running call is left to end."""
        if self._worker is None:
            return
        self._worker.cancel()
        try:
            await self._worker
        except asyncio.CancelledError:
            pass
        for entry in self._pending:
            if not entry.future.done():
                entry.future.set_exception(QueueFullError("the server is shutting down"))
        self._pending.clear()
        self._set_gauge()
        self._executor.shutdown(wait=False)
        self._worker = self._executor = None

    @property
    def running(self) -> bool:
        return self._worker is not None and not self._worker.done()

    @property
    def queued_images(self) -> int:
        return sum(entry.job.n for entry in self._pending)

    # -- requests -----------------------------------------------------------------------------

    async def submit(self, job: ImageJob) -> BatchedResult:
        """Queue a job and wait for its images.

        Raises:
            QueueFullError: at once, when ``max_queue`` images wait already.
            RequestError: more images than a batch holds, or the job's style left the bank before its batch ran.
            asyncio.CancelledError: the caller was cancelled; the job left the queue (or its images are dropped).
        """
        if not self.running:
            raise QueueFullError("the batcher is not running")
        if job.n > self.max_batch:
            raise RequestError(f"n must be from 1 to {self.max_batch} (the batch size), got {job.n}", "n")
        if self.queued_images + job.n > self.max_queue:
            raise QueueFullError(f"{self.queued_images} images are queued (limit {self.max_queue}); retry later")
        entry = _Entry(job, asyncio.get_running_loop().create_future())
        self._pending.append(entry)
        self._set_gauge()
        self._wakeup.set()
        try:
            return await entry.future
        finally:
            if entry in self._pending:  # cancelled while waiting: the slot goes back
                self._pending.remove(entry)
                self._set_gauge()
                self._wakeup.set()  # the oldest request may have changed

    async def run_exclusive(self, function: Callable[..., Any], *args, **kwargs) -> Any:
        """Run ``function(*args, **kwargs)`` on the pipeline thread, between two batches."""
        if not self.running:
            raise QueueFullError("the batcher is not running")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: function(*args, **kwargs))

    # -- the worker ---------------------------------------------------------------------------

    def _set_gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.queued_images.set(self.queued_images)

    def _select(self) -> tuple[list[_Entry], bool]:
        """The oldest entry and the later ones with its key that fit; and whether the batch is complete."""
        first = self._pending[0]
        batch, images, complete = [], 0, False
        for entry in self._pending:
            if entry.job.key != first.job.key:
                continue
            if images + entry.job.n > self.max_batch:
                complete = True  # a compatible request must wait for the next call anyway: go now
                continue
            batch.append(entry)
            images += entry.job.n
        return batch, complete or images >= self.max_batch

    async def _gather(self) -> list[_Entry]:
        while True:
            if not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            batch, complete = self._select()
            remaining = batch[0].arrived + self.max_wait_s - time.perf_counter()
            if complete or remaining <= 0:
                for entry in batch:
                    self._pending.remove(entry)
                self._set_gauge()
                return batch
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except asyncio.TimeoutError:
                pass

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._gather()
            batch = [entry for entry in batch if not entry.future.done()]
            if not batch:
                continue
            start = time.perf_counter()
            jobs = [entry.job for entry in batch]
            try:
                outcomes = await loop.run_in_executor(self._executor, self.engine.run, jobs)
            except Exception as error:  # the engine reports per-job errors itself; this is a bug or a dead thread
                logger.exception("batch failed")
                outcomes = [error] * len(batch)
            computed = [outcome for outcome in outcomes if isinstance(outcome, JobResult)]
            if self.metrics is not None and computed:
                self.metrics.batch_size.observe(computed[0].batch_size)
                self.metrics.compute_seconds.observe(computed[0].compute_s)
            for entry, outcome in zip(batch, outcomes, strict=True):
                queue_s = start - entry.arrived
                if self.metrics is not None:
                    self.metrics.queue_seconds.observe(queue_s)
                if entry.future.done():  # its client went away during the call
                    continue
                if isinstance(outcome, JobResult):
                    entry.future.set_result(BatchedResult(outcome, queue_s))
                else:
                    entry.future.set_exception(outcome)
