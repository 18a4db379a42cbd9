"""How long-running work reports progress and learns that the user wants it to stop.

Library code takes a `Progress`; the default reports nothing, the CLI shows tqdm bars, and the WebUI
adapter drives the WebUI's own progress bar and interrupt button through the same two methods.
A job's work also gets a `Control` (the user's stop and save requests) and reports `Status`es.
This module imports nothing heavy: starting a download or tagging job never loads torch.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass


class Task:
    def advance(self, n: int = 1, note: str = "") -> None:
        """`n` more units done; `note` is a short status (e.g. the last file's name or a rate)."""

    def __enter__(self) -> "Task":
        return self

    def __exit__(self, *exc) -> None:
        pass


class Progress:
    def task(self, description: str, total: int | None, unit: str = "img") -> Task:
        return Task()

    def should_stop(self) -> bool:
        return False


class TqdmProgress(Progress):
    """Progress bars on stderr for the CLI (only on a terminal: piped stderr keeps just the messages)."""

    def task(self, description: str, total: int | None, unit: str = "img") -> Task:
        return _TqdmTask(description, total, unit)


class _TqdmTask(Task):
    def __init__(self, description: str, total: int | None, unit: str):
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc=description, unit=unit, dynamic_ncols=True, leave=False, disable=None)

    def advance(self, n: int = 1, note: str = "") -> None:
        if note:
            self.bar.set_postfix_str(note, refresh=False)
        self.bar.update(n)

    def __exit__(self, *exc) -> None:
        self.bar.close()


class Control:
    """How the user steers a running training from another thread (the tab's buttons, Ctrl-C)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.stop_requested = False
        self.save_on_stop = False
        self.save_requested = False

    def stop(self, save: bool = False) -> None:
        with self._lock:
            self.stop_requested = True
            self.save_on_stop = self.save_on_stop or save

    def save_now(self) -> None:
        with self._lock:
            self.save_requested = True

    def take_save_request(self) -> bool:
        with self._lock:
            wanted, self.save_requested = self.save_requested, False
            return wanted


@dataclass
class Status:
    """One progress report: after every step, and at phase changes (`phase`)."""

    phase: str  # "caching latents", "training", "saving", "done"
    step: int = 0
    total_steps: int = 0
    epoch: int = 0  # 1-based while training
    epochs: int = 0
    loss: float | None = None  # running mean of the last steps
    lr: float | None = None
    it_per_s: float | None = None
    eta_s: float | None = None
    message: str = ""  # what to tell the user at a phase change (the step arithmetic, its warnings)
    peak_memory_gb: float | None = None  # the GPU's peak allocation so far (None on the CPU)
