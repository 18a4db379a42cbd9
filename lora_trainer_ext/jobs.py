"""Long work (a training run) in a background thread, steered and watched by polling.

The tab and the API start a job and return at once; the browser then polls `snapshot()` (it survives
a dropped websocket, and a reloaded page simply polls again: it re-attaches to the running job). One
job runs at a time. The host supplies `guard`, the context the job runs in (the WebUI's GPU queue
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

from .errors import LoraMakerError
from .trainer import Control, Result, Status

RUNNING, DONE, STOPPED, FAILED = "running", "done", "stopped", "failed"
_ids = itertools.count(1)


@dataclass
class Job:
    id: int
    title: str  # e.g. "train mychar"
    project: str
    started_at: float = field(default_factory=time.time)
    state: str = RUNNING
    status: Status | None = None
    losses: list[tuple[int, float]] = field(default_factory=list)  # (step, loss) for the chart
    files: list[str] = field(default_factory=list)
    error: str = ""
    finished_at: float | None = None
    control: Control = field(default_factory=Control, repr=False)

    def snapshot(self) -> dict:
        """A JSON-ready picture of the job for the UI and the API."""
        return {
            "id": self.id, "title": self.title, "project": self.project, "state": self.state,
            "started_at": self.started_at, "finished_at": self.finished_at, "error": self.error,
            "status": asdict(self.status) if self.status else None, "losses": list(self.losses),
            "files": list(self.files),
        }


Work = Callable[[Control, Callable[[Status], None]], Result]


class JobRunner:
    def __init__(self, guard: Callable[[], ContextManager] = contextlib.nullcontext,
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

    def start(self, title: str, project: str, work: Work) -> Job:
        """Run `work(control, on_status)` in a thread; LoraMakerError if a job is already running."""
        with self._lock:
            if self.busy():
                raise LoraMakerError(f"'{self._job.title}' is still running: stop it or wait for it to finish")
            job = Job(next(_ids), title, project)
            self._job = job
            self._thread = threading.Thread(target=self._run, args=(job, work), name=f"lora-maker-{job.id}", daemon=True)
            self._thread.start()
        return job

    def _run(self, job: Job, work: Work) -> None:
        def on_status(status: Status) -> None:
            job.status = status
            if status.phase == "training" and status.loss is not None:
                job.losses.append((status.step, status.loss))
            self._observe(job)

        try:
            with self._guard():
                result = work(job.control, on_status)
            job.files = [str(p) for p in result.files]
            job.state = STOPPED if result.stopped else DONE
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
