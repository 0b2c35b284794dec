"""Dynamic batching of caption requests.

Requests wait in an asyncio queue. A collector takes the first one, then keeps taking requests for
up to ``max_wait_ms`` or until ``max_batch`` are in hand — but only when the server is busy (the
last batch held several requests, or more are queued or being parsed): a lone client never
waits for company. The wait matters under load: without it, clients settle into two half-size
batches that alternate (the clients of the batch that just finished have not sent their next
request yet when the other half is taken). Then the batch is split into groups of
requests whose generation options match (strategy, beams, tokens, prefix, penalties, ...), and
each group runs as one ``generate`` call — one pass through the image tower and the cached
decoder. Model work runs in a single worker thread, so the event loop keeps serving health checks
and the page while a batch decodes. A full queue answers "busy" at once instead of growing.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch


class Busy(Exception):
    pass


@dataclass
class CaptionJob:
    image: torch.Tensor                 # [3, S, S] normalised
    options: tuple                      # hashable generation options (the server's CaptionOptions): equal ones share a batch
    future: asyncio.Future
    queued_at: float = field(default_factory=time.perf_counter)


class CaptionBatcher:
    def __init__(self, run_batch, max_batch: int = 16, max_wait_ms: float = 10.0, max_queue: int = 256,
                 metrics=None, executor: ThreadPoolExecutor | None = None):
        """``run_batch(images [B, 3, S, S], options) -> list of per-image results`` (in the worker thread)."""
        self.run_batch, self.max_batch, self.max_wait = run_batch, max_batch, max_wait_ms / 1000
        self.queue: asyncio.Queue[CaptionJob] = asyncio.Queue(maxsize=max_queue)
        self.metrics = metrics
        self.executor = executor or ThreadPoolExecutor(max_workers=1, thread_name_prefix="coca-model")
        self.task: asyncio.Task | None = None
        self.expecting = 0        # caption requests being parsed that will be submitted (event-loop thread only)
        self.last_batch = 0

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._collect())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass

    async def submit(self, image: torch.Tensor, options: tuple):
        job = CaptionJob(image, options, asyncio.get_running_loop().create_future())
        try:
            self.queue.put_nowait(job)
        except asyncio.QueueFull:
            raise Busy(f"the server is busy ({self.queue.maxsize} caption requests waiting); retry shortly") from None
        return await job.future

    async def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = [await self.queue.get()]
            busy = self.last_batch > 1 or not self.queue.empty() or self.expecting > 0
            deadline = loop.time() + (self.max_wait if busy else 0.0)
            while len(jobs) < self.max_batch:
                if not self.queue.empty():
                    jobs.append(self.queue.get_nowait())
                    continue
                timeout = deadline - loop.time()
                if timeout <= 0:
                    break
                try:
                    jobs.append(await asyncio.wait_for(self.queue.get(), timeout))
                except asyncio.TimeoutError:
                    break
            self.last_batch = len(jobs)
            groups: dict[tuple, list[CaptionJob]] = {}
            for job in jobs:
                groups.setdefault(job.options, []).append(job)
            for options, group in groups.items():
                start = time.perf_counter()
                if self.metrics is not None:
                    self.metrics.observe_batch(len(group), [start - j.queued_at for j in group])
                images = torch.stack([j.image for j in group])
                try:
                    results = await loop.run_in_executor(self.executor, self.run_batch, images, options)
                except Exception as e:  # a failed batch fails its requests, not the server
                    for j in group:
                        if not j.future.done():
                            j.future.set_exception(e)
                    continue
                for j, r in zip(group, results):
                    if not j.future.done():
                        j.future.set_result(r)
