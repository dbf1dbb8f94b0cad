"""Continuous batching: one thread owns the generators and steps them while any request is live.

Requests (`Job`s) enter through a locked queue and join the running batch at the next step boundary; each
job's prompts leave the batch as soon as they finish. Results go back through `Job.sink`, which the HTTP layer
points at its event loop (`loop.call_soon_threadsafe`), so the engine thread never touches asyncio objects.

Messages a sink receives, in order:
    ("tokens", [TokenUpdate, ...])          streaming jobs only, once per step that produced tokens
    ("prompt_done", prompt_index, [SequenceOutput, ...], alternatives)   once per prompt
    ("done",)                               after the last prompt
    ("error", status, message, error_type)  instead of the rest: timeout or an internal failure

Two generator behaviours shape this file (both reported upstream):
* a GPT-2 batch's KV cache keeps every column any row ever used, so a batch that never empties grows without
  bound. New jobs therefore join the newest batch only while its width stays within `width_budget`; past it
  they start a fresh generator and the old one drains. Each step steps every batch.
* `Generator.pop` of a cancelled prompt before the next `step` breaks that step, so cancelled prompts are
  popped only after a step.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable

from ..generator import Generator
from .alternatives import as_dict, peek_alternatives
from .job import Job, Overloaded, ShuttingDown, TokenUpdate, send
from .metrics import ServerMetrics

__all__ = ["Engine", "Job", "Overloaded", "ShuttingDown", "TokenUpdate"]

logger = logging.getLogger(__name__)


class _Batch:
    """One generator and the jobs in it; `width` tracks (an upper bound of) its KV cache length, and `end` the
    width it reaches by the time its current jobs are done."""

    def __init__(self, generator: Generator):
        self.generator = generator
        self.width = 0
        self.end = 0
        self.jobs: dict[int, Job] = {}  # handle -> job
        self.retired = False  # takes no new jobs

    @property
    def live(self) -> bool:
        return not self.generator.is_done()

    def fits(self, jobs: list[Job], budget: float) -> bool:
        """Whether `jobs`, prefilled together, can join without the cache outgrowing `budget`."""
        if self.retired:
            return False
        if budget == math.inf:  # T5: no growing cache to bound
            return True
        start, end = self.joined(max(len(p) for job in jobs for p in job.prompts), self.live)
        alone = not self.jobs and len(jobs) == 1  # an empty generator takes any one job
        return alone or max(end, start + max(job.max_new_tokens() for job in jobs)) <= budget

    def joined(self, longest: int, live: bool) -> tuple[int, int]:
        """(width, end) once prompts of at most `longest` tokens join (`live`: while others run). A longer prompt
        left-pads every running row, so the jobs already running end that much later too."""
        if not live:
            return longest, longest
        start = max(self.width, longest)
        return start, self.end + start - self.width


class Engine:
    def __init__(
        self,
        model,
        detokenize: Callable[[list[int]], str],
        *,
        max_batch_rows: int = 32,
        max_queue: int = 64,
        width_budget: float | None = None,
        metrics: ServerMetrics | None = None,
    ):
        if max_batch_rows < 1 or max_queue < 1:
            raise ValueError(f"max_batch_rows and max_queue must be >= 1, got {max_batch_rows} and {max_queue}")
        self.model, self.detokenize = model, detokenize
        self.max_batch_rows, self.max_queue = max_batch_rows, max_queue
        self.width_budget = math.inf if width_budget is None else width_budget
        self.metrics = metrics or ServerMetrics()
        self._cond = threading.Condition()
        self._inbox: deque[Job] = deque()
        self._running: list[Job] = []
        self._batches: list[_Batch] = []
        self._thread: threading.Thread | None = None
        self.draining = False
        self._stopping = False

    # -- called from the event loop ----------------------------------------------------------------------
    def submit(self, job: Job) -> None:
        if job.rows > self.max_batch_rows:  # it could never start; the HTTP layer answers 400 before this
            raise ValueError(f"the job needs {job.rows} rows; the batch holds {self.max_batch_rows}")
        with self._cond:
            if self.draining or self._stopping:
                raise ShuttingDown("the server is shutting down")
            if len(self._inbox) >= self.max_queue:
                self._drop_stale(time.monotonic())
            if len(self._inbox) >= self.max_queue:
                raise Overloaded(f"{len(self._inbox)} requests are already waiting (max_queue={self.max_queue})")
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="onnxgen-engine", daemon=True)
                self._thread.start()
            self._inbox.append(job)
            self._cond.notify()

    def cancel(self, job: Job) -> None:
        with self._cond:
            job.cancelled = True
            self._cond.notify()

    def begin_drain(self) -> None:
        with self._cond:
            self.draining = True

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the thread; jobs still queued or running get a 503 error."""
        with self._cond:
            self.draining = self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def queue_depth(self) -> int:
        return len(self._inbox)

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def batch_rows(self) -> int:
        return sum(j.rows for j in self._running)

    # -- the engine thread -------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._inbox and not self._running and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    self._fail_all(503, "the server shut down before the request finished", "service_unavailable")
                    return
                admitted = self._take_admissible()
            try:
                self._admit(admitted)
                self._iterate()
            except Exception:  # never let the thread die: fail what is in flight and start over
                logger.exception("engine step failed; failing the requests in flight")
                with self._cond:
                    # jobs taken from the queue but not yet running would otherwise never be answered
                    for job in admitted:
                        if job not in self._running:
                            send(job, ("error", 500, "internal error while generating", "internal_error"))
                    self._fail_running(500, "internal error while generating", "internal_error")

    def _drop_stale(self, now: float) -> None:
        """Take cancelled and expired jobs out of the whole queue (lock held): behind a job that waits for rows
        they would hold queue places and get their 504 only once they reached the front."""
        if not any(job.cancelled or job.expired(now) for job in self._inbox):
            return
        waiting = deque()
        for job in self._inbox:
            if job.cancelled:
                continue
            if job.expired(now):
                send(job, ("error", 504, _timeout_message(job), "timeout"))
            else:
                waiting.append(job)
        self._inbox = waiting

    def _take_admissible(self) -> list[Job]:
        """FIFO jobs that fit the free rows (called with the lock held); drops cancelled and expired ones."""
        now, taken = time.monotonic(), []
        free = self.max_batch_rows - self.batch_rows
        self._drop_stale(now)
        while self._inbox:
            job = self._inbox[0]
            if job.rows <= free:
                self._inbox.popleft()
                free -= job.rows
                taken.append(job)
            else:
                break
        return taken

    def _admit(self, jobs: list[Job]) -> None:
        groups: list[tuple[_Batch, list[Job]]] = []
        for job in jobs:
            batch = self._batches[-1] if self._batches else None
            joining = groups[-1][1] if groups and groups[-1][0] is batch else []  # prefilled with this one
            if batch is None or not batch.fits([*joining, job], self.width_budget):
                batch = self._new_batch()
            if not groups or groups[-1][0] is not batch:
                groups.append((batch, []))
            groups[-1][1].append(job)
        for batch, group in groups:
            self._add(batch, group)

    def _new_batch(self) -> _Batch:
        batch = _Batch(Generator(self.model, self.detokenize))
        self._batches.append(batch)
        return batch

    def _add(self, batch: _Batch, jobs: list[Job]) -> None:
        prompts = [p for job in jobs for p in job.prompts]
        plans = [job.plan for job in jobs for _ in job.prompts]
        was_live = batch.live
        try:
            handles = batch.generator.add(prompts, plans)
        except Exception:
            # A failed add can leave half-registered prompts behind: take no more jobs into this generator,
            # and retry the jobs one by one in fresh ones so only the one at fault fails.
            batch.retired = True
            if len(jobs) > 1:
                for job in jobs:
                    self._add(self._new_batch(), [job])
                return
            logger.exception("prefill failed for %d prompts", len(prompts))
            send(jobs[0], ("error", 500, "internal error while reading the prompt", "internal_error"))
            return
        batch.width, end = batch.joined(max(len(p) for p in prompts), was_live)
        if self.width_budget != math.inf:
            end = max([end] + [batch.width + job.max_new_tokens() for job in jobs])
        batch.end = end
        now, it = time.monotonic(), iter(handles)
        for job in jobs:
            job.admitted, job._batch = now, batch
            self.metrics.queue_wait.observe(now - job.submitted)
            for index in range(len(job.prompts)):
                handle = next(it)
                job._handles[handle] = index
                batch.jobs[handle] = job
        with self._cond:
            self._running.extend(jobs)

    def _iterate(self) -> None:
        now = time.monotonic()
        for job in list(self._running):
            if job.cancelled:
                self._stop_rows(job)
            elif job.expired(now):
                send(job, ("error", 504, _timeout_message(job), "timeout"))
                job.cancelled = True
                self._stop_rows(job)
        for batch in list(self._batches):
            if batch.jobs:
                self._step(batch)
        with self._cond:
            self._running = [j for j in self._running if j._handles]
            # Only the newest batch takes new jobs; older ones are dropped once empty.
            self._batches = [b for b in self._batches[:-1] if b.jobs] + self._batches[-1:]

    def _stop_rows(self, job: Job) -> None:
        """Cancel a job's unfinished prompts; their rows leave at the next step and are popped after it."""
        for handle in job._handles:
            if not job._batch.generator.is_finished(handle):
                job._batch.generator.cancel(handle)

    def _step(self, batch: _Batch) -> None:
        generator = batch.generator
        wanted = {h: j.top_logprobs for h, j in batch.jobs.items() if j.top_logprobs and not j.cancelled}
        alternatives = peek_alternatives(generator, wanted) if wanted else {}
        was_live, started = batch.live, time.perf_counter()
        try:
            events = generator.step()  # also when nothing is live: it lets go of cancelled rows
        except Exception:
            logger.exception("generator step failed; failing its %d prompts", len(batch.jobs))
            self._fail_batch(batch)
            return
        if was_live:
            batch.width += 1
            self.metrics.step.observe(time.perf_counter() - started)
        self._dispatch(batch, events, alternatives)
        for handle in [h for h in batch.jobs if generator.is_finished(h)]:
            self._finish_prompt(batch, handle)

    def _dispatch(self, batch: _Batch, events, alternatives) -> None:
        updates: dict[Job, list[TokenUpdate]] = {}
        now, count = time.monotonic(), 0
        for event in events:
            job = batch.jobs.get(event.prompt)
            if job is None or event.token_id is None:
                continue
            count += 1
            job.generated_tokens += 1
            if job.first_token is None:
                job.first_token = now
                self.metrics.first_token.observe(now - (job.admitted or now))
            alts = as_dict(alternatives.get((event.prompt, event.sequence)))
            if job.stream:
                index = job._handles[event.prompt]
                update = TokenUpdate(index, event.sequence, event.token_id, event.logprob, event.finish_reason, alts)
                updates.setdefault(job, []).append(update)
            elif job.top_logprobs is not None:
                job._alternatives.setdefault((event.prompt, event.sequence), []).append(alts)
        self.metrics.generated_tokens.inc(count)
        for job, items in updates.items():
            send(job, ("tokens", items))

    def _finish_prompt(self, batch: _Batch, handle: int) -> None:
        job = batch.jobs.pop(handle)
        outputs = batch.generator.pop(handle)
        index = job._handles.pop(handle)
        if job.plan.is_beam_search:
            self.metrics.generated_tokens.inc(sum(len(o.token_ids) for o in outputs))
        alternatives = [job._alternatives.get((handle, s)) for s in range(len(outputs))]
        send(job, ("prompt_done", index, outputs, alternatives))
        if not job._handles:
            send(job, ("done",))

    def _fail_batch(self, batch: _Batch) -> None:
        for job in set(batch.jobs.values()):
            send(job, ("error", 500, "internal error while generating", "internal_error"))
            job._handles.clear()
        batch.jobs.clear()
        batch.generator = Generator(self.model, self.detokenize)
        batch.width = batch.end = 0

    def _fail_running(self, status: int, message: str, error_type: str) -> None:
        for job in self._running:
            send(job, ("error", status, message, error_type))
            job._handles.clear()
        self._running, self._batches = [], []

    def _fail_all(self, status: int, message: str, error_type: str) -> None:
        self._fail_running(status, message, error_type)
        while self._inbox:
            send(self._inbox.popleft(), ("error", status, message, error_type))


def _timeout_message(job: Job) -> str:
    return f"the request took longer than the server's timeout of {job.timeout:g} s"
