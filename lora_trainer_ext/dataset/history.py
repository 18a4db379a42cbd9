"""Undoable edits of a project's text files (captions, settings.json).

Each edit is one numbered JSON-lines file in history/: a header line, then one line per changed file
with its text before and after, appended *before* the file is rewritten. An edit cut short by a crash
or an interrupt is therefore still undoable: undo restores every file that shows the edit's text and
leaves alone the ones the edit never reached.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from .. import files
from ..errors import LoraMakerError
from ..project import Project
from .captions import read_text


@dataclass
class Change:
    file: str  # relative to the project folder
    before: str | None  # None: the file did not exist
    after: str | None


@dataclass
class Edit:
    number: int
    description: str
    time: str
    changes: list[Change] = field(default_factory=list)


class History:
    def __init__(self, project: Project):
        self.project = project
        self.dir = project.history_dir

    def _files(self) -> list[Path]:
        return sorted(self.dir.glob("[0-9]*.jsonl")) if self.dir.is_dir() else []

    def edits(self) -> list[Edit]:
        return [self._load(p) for p in self._files()]

    def _load(self, path: Path) -> Edit:
        lines = path.read_text(encoding="utf-8").splitlines()
        header = json.loads(lines[0])
        edit = Edit(int(path.stem), header["description"], header["time"])
        for line in lines[1:]:
            try:
                edit.changes.append(Change(**json.loads(line)))
            except (ValueError, TypeError):
                break  # a torn last line: the file it names was never rewritten
        return edit

    def begin(self, description: str) -> "Recorder":
        existing = self._files()
        number = int(existing[-1].stem) + 1 if existing else 1
        return Recorder(self.project, self.dir / f"{number:06d}.jsonl", description)

    def undo(self) -> Edit | None:
        """Revert the latest edit; refuse, changing nothing, if a file has been changed since."""
        existing = self._files()
        if not existing:
            return None
        edit = self._load(existing[-1])
        pending = []
        for change in reversed(edit.changes):
            path = self.project.path / change.file
            current = read_text(path)
            if current == change.before:
                continue  # the edit never got to this file
            if current != change.after:
                raise LoraMakerError(
                    f"cannot undo '{edit.description}': {change.file} was changed after it; edit it by hand"
                )
            pending.append((path, change.before))
        for path, text in pending:
            if text is None:
                path.unlink()
            else:
                files.write_text(path, text)
        existing[-1].unlink()
        return edit


class Recorder:
    """One edit in progress: `set` records a file's old and new text, then writes the new text."""

    def __init__(self, project: Project, path: Path, description: str):
        self.project = project
        self.path = path
        self.description = description
        self.changed = 0
        self._log = None

    def set(self, path: Path, text: str | None) -> bool:
        """Give the file at `path` the content `text` (None removes it). Returns whether it changed."""
        before = read_text(path)
        if before == text:
            return False
        if self._log is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._log = open(self.path, "x", encoding="utf-8")
            header = {"description": self.description, "time": time.strftime("%Y-%m-%d %H:%M:%S")}
            self._log.write(json.dumps(header, ensure_ascii=False) + "\n")
        change = {"file": self.project.relative(path), "before": before, "after": text}
        self._log.write(json.dumps(change, ensure_ascii=False) + "\n")
        self._log.flush()
        if text is None:
            Path(path).unlink()
        else:
            files.write_text(path, text)
        self.changed += 1
        return True

    def close(self) -> None:
        if self._log is not None:
            self._log.close()

    def __enter__(self) -> "Recorder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
