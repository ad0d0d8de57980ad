"""pipelines.jobs: one worker runs jobs in order; a second job waits; cancel; a failing job leaves the worker alive."""

import threading

import pytest
import torch

from pipelines.errors import Cancelled, UserError
from pipelines.jobs import CANCELLED, DONE, FAILED, OUT_OF_MEMORY, QUEUED, RUNNING, JobQueue


def blocking_job(started: threading.Event, release: threading.Event, result="first"):
    """A job that says it started, then waits until the test releases it (or its cancel event is set)."""

    def run(job):
        started.set()
        while not release.wait(0.01):
            if job.cancel_event.is_set():
                raise Cancelled("stopped on request")
        return result

    return run


def test_a_second_job_waits_in_the_queue_and_runs_after_the_first():
    queue = JobQueue()
    started, release = threading.Event(), threading.Event()
    order = []
    first = queue.submit("train", "first", lambda job: order.append("first") or blocking_job(started, release)(job))
    assert started.wait(5)
    second = queue.submit("generate", "second", lambda job: order.append("second") or 42)
    assert queue.snapshot(first.id).status == RUNNING
    waiting = queue.snapshot(second.id)
    assert (waiting.status, waiting.position) == (QUEUED, 1)
    release.set()
    assert queue.wait(second.id, timeout=5).result == 42
    assert order == ["first", "second"]
    assert queue.snapshot(first.id).status == DONE and queue.snapshot(first.id).result == "first"


def test_queue_positions_count_from_the_next_job():
    queue = JobQueue()
    started, release = threading.Event(), threading.Event()
    queue.submit("train", "running", blocking_job(started, release))
    assert started.wait(5)
    waiting = [queue.submit("generate", f"job {i}", lambda job: None) for i in range(3)]
    assert [queue.snapshot(s.id).position for s in waiting] == [1, 2, 3]
    queue.cancel(waiting[0].id)
    assert [queue.snapshot(s.id).position for s in waiting[1:]] == [1, 2]
    release.set()


def test_cancel_a_waiting_job_drops_it_and_cancel_a_running_job_stops_it():
    queue = JobQueue()
    started, release = threading.Event(), threading.Event()
    running = queue.submit("train", "running", blocking_job(started, release))
    assert started.wait(5)
    ran = []
    waiting = queue.submit("train", "waiting", lambda job: ran.append(True))
    assert queue.cancel(waiting.id).status == CANCELLED
    queue.cancel(running.id)
    stopped = queue.wait(running.id, timeout=5)
    assert stopped.status == CANCELLED and "stopped on request" in stopped.message
    follow_up = queue.submit("train", "after", lambda job: "ok")
    assert queue.wait(follow_up.id, timeout=5).result == "ok"
    assert ran == []  # the cancelled waiting job never ran


@pytest.mark.parametrize("error, expected", [
    (UserError("no photos given; upload photos"), "no photos given; upload photos"),
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"), OUT_OF_MEMORY),
    (ValueError("a bug"), "internal error (ValueError: a bug)"),
])
def test_an_error_in_a_job_is_its_message_and_the_worker_keeps_going(error, expected):
    queue = JobQueue()

    def fail(job):
        raise error

    failed = queue.wait(queue.submit("train", "fails", fail).id, timeout=5)
    assert failed.status == FAILED
    assert failed.message.startswith(expected)
    after = queue.submit("generate", "next", lambda job: "still alive")
    assert queue.wait(after.id, timeout=5).result == "still alive"


def test_progress_and_previews_are_visible_while_the_job_runs():
    queue = JobQueue()
    reported, release = threading.Event(), threading.Event()

    def run(job):
        job.update(step=3, total=10, loss=0.25, eta_seconds=7.0, stage="training")
        job.add_preview("/tmp/a.png")
        reported.set()
        release.wait(5)

    state = queue.submit("train", "progress", run)
    assert reported.wait(5)
    seen = queue.snapshot(state.id)
    assert (seen.step, seen.total, seen.loss, seen.eta_seconds, seen.previews) == (3, 10, 0.25, 7.0, ("/tmp/a.png",))
    assert queue.latest("train").id == state.id and queue.latest("fuse") is None
    release.set()
    assert queue.wait(state.id, timeout=5).status == DONE


def test_old_finished_jobs_are_forgotten_beyond_the_limit():
    queue = JobQueue(keep_finished=2)
    states = [queue.submit("generate", f"job {i}", lambda job: None) for i in range(4)]
    queue.wait(states[-1].id, timeout=5)
    queue.submit("generate", "one more", lambda job: None)
    assert queue.snapshot(states[0].id) is None
    assert len([s for s in queue.jobs() if not s.active]) <= 3
