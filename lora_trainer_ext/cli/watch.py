"""A job of the Studio followed in the terminal: its phases as lines on stdout, its counts as tqdm bars on
stderr (only on a terminal), Ctrl-C as the tab's Stop (the job stops where it can and
keeps what it did; a second Ctrl-C abandons the wait)."""

from __future__ import annotations

import sys

from ..errors import LoraMakerError
from ..jobs import FAILED, Job


class Watch:
    """The observer of the CLI's job runner: called from the job's thread after every status."""

    def __init__(self):
        self.phase: str | None = None
        self.bar = None

    def __call__(self, job: Job) -> None:
        status = job.status
        if status is None or job.finished_at is not None:
            self.close()
            return
        if status.phase != self.phase:
            self.close()
            self.phase = status.phase
            if status.message or status.phase not in ("training", "done", "saving"):
                print(status.message or f"{status.phase}...", flush=True)
        if status.total_steps:
            self.count(status)

    def count(self, status) -> None:
        from tqdm import tqdm

        if self.bar is None:
            unit = "step" if status.phase == "training" else "it"
            self.bar = tqdm(total=status.total_steps, initial=status.step, unit=unit, dynamic_ncols=True,
                            leave=False, disable=None)
        if status.loss is not None:
            self.bar.set_postfix_str(f"epoch {status.epoch}/{status.epochs} loss {status.loss:.4f} lr {status.lr:.2e}",
                                     refresh=False)
        elif status.message:
            self.bar.set_postfix_str(status.message, refresh=False)
        self.bar.update(status.step - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def run_job(studio, job: Job) -> Job:
    """Wait for `job`; Ctrl-C asks it to stop and waits for it to say so. LoraMakerError if it failed."""
    try:
        while job.finished_at is None:  # short waits: Ctrl-C reaches a waiting main thread at once
            studio.jobs.wait(0.2)
    except KeyboardInterrupt:
        print("stopping (Ctrl-C again to leave at once)...", file=sys.stderr, flush=True)
        studio.jobs.stop()
    studio.jobs.wait()  # until its last status is shown
    if job.state == FAILED:
        raise LoraMakerError(job.error)
    return job
