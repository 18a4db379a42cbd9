"""How long-running work reports progress and learns that the user wants it to stop.

Library code takes a `Progress`; the default reports nothing, the CLI shows tqdm bars, and the WebUI
adapter drives the WebUI's own progress bar and interrupt button through the same two methods.
"""

from __future__ import annotations


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
