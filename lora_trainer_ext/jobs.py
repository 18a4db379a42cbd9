"""Long work (a training run, a download, tagging) in a background thread, steered and watched by polling.

The tab and the API start a job and return at once; the browser then polls `snapshot()` (it survives
a dropped websocket, and a reloaded page simply polls again: it re-attaches to the running job). One
job runs at a time. The host supplies `guard`, the context GPU jobs run in (the WebUI's GPU queue
lock, so txt2img waits instead of colliding), and `observe`, which mirrors each status into its own
progress display.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from typing import Callable, ContextManager

from .errors import Busy, LoraMakerError, Stopped
from .progress import Control, Progress, Status, Task

RUNNING, DONE, STOPPED, FAILED = "running", "done", "stopped", "failed"
_ids = itertools.count(1)


@dataclass
class Job:
    id: int
    title: str  # e.g. "train mychar"
    project: str
    kind: str = "train"  # train, scrape, tag, caption
    task_id: str = ""  # the WebUI's progress task id, "task(lora-maker-<id>-<started>)"
    started_at: float = field(default_factory=time.time)
    state: str = RUNNING
    status: Status | None = None
    losses: list[tuple[int, float]] = field(default_factory=list)  # (step, loss) for the chart
    files: list[str] = field(default_factory=list)
    summary: str = ""  # the result in one line ("downloaded 40, already had 2")
    error: str = ""
    finished_at: float | None = None
    control: Control = field(default_factory=Control, repr=False)
    result: object = field(default=None, repr=False)  # what the work returned (the CLI reports from it)

    def snapshot(self) -> dict:
        """A JSON-ready picture of the job for the UI and the API."""
        return {
            "id": self.id, "task_id": self.task_id, "title": self.title, "project": self.project, "kind": self.kind, "state": self.state,
            "started_at": self.started_at, "finished_at": self.finished_at, "error": self.error,
            "summary": self.summary,
            "status": asdict(self.status) if self.status else None, "losses": list(self.losses),
            "files": list(self.files),
        }


# `work(control, on_status)` returns its result: anything with optional `files`, `stopped` and `summary()`
# (trainer.Result, scrape.Result, tagger.TagReport).
Work = Callable[[Control, Callable[[Status], None]], object]


class JobProgress(Progress):
    """Library progress (`Progress`) as job statuses, and the job's stop request as `should_stop`."""

    def __init__(self, control: Control, on_status: Callable[[Status], None]):
        self.control, self.on_status = control, on_status

    def task(self, description: str, total: int | None, unit: str = "img") -> Task:
        return _JobTask(self, description, total)

    def should_stop(self) -> bool:
        return self.control.stop_requested


class _JobTask(Task):
    def __init__(self, progress: JobProgress, description: str, total: int | None):
        self.progress, self.description, self.total, self.done = progress, description, total or 0, 0
        self.started = time.monotonic()
        progress.on_status(Status(description, 0, self.total))

    def advance(self, n: int = 1, note: str = "") -> None:
        self.done += n
        elapsed = time.monotonic() - self.started
        rate = self.done / elapsed if elapsed > 0 else None
        eta = (self.total - self.done) / rate if rate and self.total else None
        self.progress.on_status(Status(self.description, self.done, self.total, it_per_s=rate, eta_s=eta, message=note))


class JobRunner:
    def __init__(self, guard: Callable[[Job], ContextManager] = lambda job: contextlib.nullcontext(),
                 observe: Callable[[Job], None] | None = None):
        self._guard = guard
        self._observe = observe or (lambda job: None)
        self._lock = threading.Lock()
        self._job: Job | None = None
        self._thread: threading.Thread | None = None

    def current(self) -> Job | None:
        """The running job, or the last one (finished jobs stay visible until the next starts)."""
        return self._job

    def busy(self) -> bool:
        return self._job is not None and self._job.state == RUNNING

    def start(self, title: str, project: str, work: Work, kind: str = "train", gpu: bool = True) -> Job:
        """Run `work(control, on_status)` in a thread (under the guard when it uses the `gpu`);
        LoraMakerError if a job is already running."""
        with self._lock:
            if self.busy():
                raise Busy(f"'{self._job.title}' is still running: wait for it to finish or stop it first")
            job = Job(next(_ids), title, project, kind)
            job.task_id = f"task(lora-maker-{job.id}-{int(job.started_at)})"
            self._job = job
            guard = self._guard if gpu else lambda job: contextlib.nullcontext()
            self._thread = threading.Thread(target=self._run, args=(job, work, guard), name=f"lora-maker-{job.id}",
                                            daemon=True)
            self._thread.start()
        return job

    def _run(self, job: Job, work: Work, guard: Callable[[Job], ContextManager]) -> None:
        def on_status(status: Status) -> None:
            job.status = status
            if status.phase == "training" and status.loss is not None:
                job.losses.append((status.step, status.loss))
            self._observe(job)

        try:
            with guard(job):
                result = job.result = work(job.control, on_status)
            job.files = [str(p) for p in getattr(result, "files", [])]
            job.summary = result.summary() if hasattr(result, "summary") else ""
            stopped = getattr(result, "stopped", False) or job.control.stop_requested
            job.state = STOPPED if stopped else DONE
        except Stopped as e:
            job.summary, job.state = str(e), STOPPED
        except LoraMakerError as e:
            job.error, job.state = str(e), FAILED
        except BaseException as e:  # a bug or the GPU: say what, keep the UI alive
            job.error, job.state = f"{type(e).__name__}: {e}", FAILED
            traceback.print_exc()
        finally:
            job.finished_at = time.time()
            self._observe(job)

    def stop(self, save: bool = False) -> None:
        if self.busy():
            self._job.control.stop(save=save)

    def save_now(self) -> None:
        if self.busy():
            self._job.control.save_now()

    def wait(self, timeout: float | None = None) -> Job | None:
        """Block until the current job ends (for the CLI and the tests)."""
        if self._thread is not None:
            self._thread.join(timeout)
        return self._job
