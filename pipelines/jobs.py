"""A first-in, first-out queue of long jobs run one at a time by a single worker thread.

The studio sends every piece of GPU work (training, fusion, generation) through one `JobQueue`,
so one job holds the GPU at a time and the others wait in a visible queue. A job's state lives
here, not in a browser connection: closing the page does not stop a job, and a page opened later
reads the same state. Nothing here knows about Gradio.

    queue = JobQueue()
    job = queue.submit("train", "training <mochi>", lambda job: train(..., callback=job.update, cancel=job.cancel_event))
    queue.snapshot(job.id)  # -> JobState: status, queue position, step, total, loss, ETA, previews, error
    queue.cancel(job.id)    # queued: dropped; running: its cancel event is set, the work stops at its next check
"""

from __future__ import annotations

import itertools
import logging
import queue as queue_module
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import torch

from .errors import Cancelled, UserError

logger = logging.getLogger(__name__)

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
FINISHED = (DONE, FAILED, CANCELLED)
OUT_OF_MEMORY = "out of GPU memory; use fewer or smaller images, a smaller batch size or resolution, and try again"


@dataclass(frozen=True)
class JobState:
    """A copy of a job's state at one moment (what a page poll reads)."""

    id: int
    kind: str  # "train", "fuse", "generate"...: what the page uses to pick its jobs
    title: str  # e.g. "training <mochi>"
    status: str = QUEUED  # QUEUED, RUNNING, DONE, FAILED or CANCELLED
    position: int = 0  # 1 = next to run; 0 when not waiting
    step: int = 0
    total: int = 0
    stage: str = ""  # what the job is doing now, e.g. "UNet inputs of <mochi>"
    loss: float | None = None
    eta_seconds: float | None = None
    previews: tuple[str, ...] = ()  # image paths, oldest first
    message: str = ""  # a note for the person (done) or the error (failed, cancelled)
    result: Any = None  # what the job's function returned
    created: float = 0.0
    started: float | None = None
    finished: float | None = None

    @property
    def active(self) -> bool:
        return self.status in (QUEUED, RUNNING)


class Job:
    """A job as its function sees it: progress goes in through `update`, `cancel_event` says stop."""

    def __init__(self, job_id: int, kind: str, title: str, run: Callable[["Job"], Any]):
        self.run = run
        self.cancel_event = threading.Event()
        self._lock = threading.Lock()
        self._state = JobState(id=job_id, kind=kind, title=title, created=time.time())

    @property
    def id(self) -> int:
        return self._state.id

    def update(self, **changes) -> None:
        """Record progress: any JobState field, e.g. `job.update(step=3, total=10, loss=0.12)`."""
        with self._lock:
            self._state = replace(self._state, **changes)

    def add_preview(self, path: str) -> None:
        with self._lock:
            self._state = replace(self._state, previews=self._state.previews + (str(path),))

    def state(self) -> JobState:
        with self._lock:
            return self._state


def error_message(error: BaseException) -> str:
    """What the person sees for an error a job raised."""
    if isinstance(error, (UserError, Cancelled)):
        return str(error)
    if isinstance(error, torch.OutOfMemoryError) or (isinstance(error, (RuntimeError, MemoryError)) and "out of memory" in str(error).lower()):
        return OUT_OF_MEMORY
    return f"internal error ({type(error).__name__}: {error}); the details are in the server log"


class JobQueue:
    """Jobs run one at a time, in submission order, on one daemon worker thread."""

    def __init__(self, keep_finished: int = 50):
        self._jobs: dict[int, Job] = {}
        self._waiting: list[int] = []  # ids in run order
        self._lock = threading.Lock()
        self._wakeup: queue_module.Queue[None] = queue_module.Queue()
        self._ids = itertools.count(1)
        self._keep_finished = keep_finished  # finished jobs remembered for the page
        self._worker = threading.Thread(target=self._work, name="menagerie-jobs", daemon=True)
        self._worker.start()

    # -- the page's side -------------------------------------------------------------------------

    def submit(self, kind: str, title: str, run: Callable[[Job], Any]) -> JobState:
        """Queue `run(job)`; it runs after every job submitted before it."""
        with self._lock:
            job = Job(next(self._ids), kind, title, run)
            self._jobs[job.id] = job
            self._waiting.append(job.id)
            self._forget_old()
        self._wakeup.put(None)
        return self.snapshot(job.id)

    def snapshot(self, job_id: int) -> JobState | None:
        """The job's state now (None for an unknown or forgotten id), with its queue position."""
        with self._lock:
            job = self._jobs.get(job_id)
            position = self._waiting.index(job_id) + 1 if job_id in self._waiting else 0
        if job is None:
            return None
        state = job.state()
        return replace(state, position=position) if state.status == QUEUED else state

    def jobs(self, kind: str | None = None) -> list[JobState]:
        """States of the remembered jobs (of one kind, if given), oldest first."""
        with self._lock:
            ids = sorted(self._jobs)
        states = [self.snapshot(i) for i in ids]
        return [s for s in states if s is not None and (kind is None or s.kind == kind)]

    def latest(self, kind: str) -> JobState | None:
        states = self.jobs(kind)
        return states[-1] if states else None

    def cancel(self, job_id: int) -> JobState | None:
        """A waiting job is dropped at once; a running one is asked to stop (its function checks)."""
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None:
                return None
            if job_id in self._waiting:
                self._waiting.remove(job_id)
                job.update(status=CANCELLED, message="cancelled before it started", finished=time.time())
        job.cancel_event.set()
        return self.snapshot(job_id)

    def wait(self, job_id: int, timeout: float | None = None) -> JobState | None:
        """Block until the job has finished (or `timeout` seconds passed); returns its state."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            state = self.snapshot(job_id)
            if state is None or not state.active:
                return state
            if deadline is not None and time.monotonic() > deadline:
                return state
            time.sleep(0.05)

    # -- the worker's side -----------------------------------------------------------------------

    def _next(self) -> Job | None:
        with self._lock:
            if not self._waiting:
                return None
            return self._jobs[self._waiting.pop(0)]

    def _work(self) -> None:
        while True:
            job = self._next()
            if job is None:
                self._wakeup.get()
                continue
            self._run(job)

    def _run(self, job: Job) -> None:
        job.update(status=RUNNING, started=time.time())
        try:
            if job.cancel_event.is_set():  # cancelled between leaving the queue and starting
                raise Cancelled("cancelled before it started")
            result = job.run(job)
        except Cancelled as stop:
            job.update(status=CANCELLED, message=str(stop), finished=time.time())
        except BaseException as error:  # noqa: BLE001 - one failed job must never stop the worker
            if not isinstance(error, (UserError, Cancelled)):
                logger.exception("job %d (%s) failed", job.id, job.state().title)
            job.update(status=FAILED, message=error_message(error), finished=time.time())
            if isinstance(error, (KeyboardInterrupt, SystemExit)):
                raise
        else:
            job.update(status=DONE, result=result, finished=time.time())
        finally:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()  # give the next job the memory this one cached

    def _forget_old(self) -> None:
        """Keep at most `keep_finished` finished jobs (called with the lock held)."""
        finished = [i for i in sorted(self._jobs) if self._jobs[i].state().status in FINISHED]
        for job_id in finished[: max(0, len(finished) - self._keep_finished)]:
            del self._jobs[job_id]
