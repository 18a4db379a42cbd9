"""A project: one LoRA's folder under the projects root.

    <root>/<name>/
        dataset/        image + same-name .txt caption pairs (what the trainer reads)
        trash/          removed images and their captions, restorable (trash.py)
        history/        every caption edit, undoable (history.py)
        settings.json   activation tags, keep_tokens, tagger and training settings
        .cache/         derived data that can be rebuilt (image hashes)
        .busy.json      while a job works on the project: which job, in which process

The busy file is how one process (the WebUI, the CLI, the standalone app) sees that another works on
the project: `claim` writes it for the length of a job, `claimed_by` reads it, ignoring the file of a
process that is gone (a killed job cannot lock a project for good).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import time
from pathlib import Path
from typing import Iterator

from . import files, migrations
from .dataset.images import IMAGE_EXTS
from .errors import Busy, LoraMakerError

# Names end up in file names and in prompts (`<lora:NAME:0.8>`): letters, digits, `_`, `-`, `.`;
# no spaces, colons, brackets or path separators.
_NAME = re.compile(r"^\w[\w.-]{0,63}$")
_WINDOWS_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(1, 10)), *(f"lpt{i}" for i in range(1, 10))}


def validate_name(name: str) -> str:
    if not _NAME.match(name or "") or name.endswith(".") or name.split(".")[0].lower() in _WINDOWS_RESERVED:
        raise LoraMakerError(
            f"invalid project name {name!r}: use 1-64 letters, digits, '_', '-' or '.', starting with a letter or digit"
        )
    return name


class Project:
    def __init__(self, root: Path, name: str):
        self.root = Path(root)
        self.name = validate_name(name)
        self.path = self.root / name
        self.dataset_dir = self.path / "dataset"
        self.trash_dir = self.path / "trash"
        self.history_dir = self.path / "history"
        self.settings_path = self.path / "settings.json"
        self.cache_dir = self.path / ".cache"
        self.busy_path = self.path / ".busy.json"

    @classmethod
    def open(cls, root: Path, name: str, create: bool = False) -> "Project":
        project = cls(root, name)
        if create:
            project.dataset_dir.mkdir(parents=True, exist_ok=True)
        elif not project.dataset_dir.is_dir():
            raise LoraMakerError(
                f"no project {name!r} in {project.root} (scrape or import images to create it, or pass --root)"
            )
        return project

    def images(self) -> list[Path]:
        """The dataset's images, sorted by name (top level of dataset/, as the trainer reads it)."""
        if not self.dataset_dir.is_dir():
            return []
        return sorted(p for p in self.dataset_dir.iterdir() if p.suffix.lower() in IMAGE_EXTS and p.is_file())

    @staticmethod
    def caption_path(image: Path) -> Path:
        return image.with_suffix(".txt")

    def settings(self) -> dict:
        """settings.json, migrated to this release's version (`migrations.py`); {} when there is none."""
        data = files.read_json(self.settings_path, {}) or {}
        if not isinstance(data, dict):
            raise LoraMakerError(f"{self.settings_path} must hold a JSON object: fix or remove it")
        return migrations.migrate(data, str(self.settings_path)) if data else {}

    def settings_text(self, replace: bool = False, **sections: dict) -> str:
        """The settings file's text with `sections` merged in (or, with `replace`, in place of the old ones)."""
        settings = self.settings() or {"version": migrations.VERSION}
        for section, values in sections.items():
            if replace:
                settings[section] = {}
            settings.setdefault(section, {}).update(values)
        return json.dumps(settings, indent=2, ensure_ascii=False) + "\n"

    def update_settings(self, **sections: dict) -> None:
        files.write_text(self.settings_path, self.settings_text(**sections))

    def replace_settings(self, **sections: dict) -> None:
        files.write_text(self.settings_path, self.settings_text(replace=True, **sections))

    @contextlib.contextmanager
    def claim(self, job: str) -> Iterator[None]:
        """Mark the project as worked on by `job` (e.g. "train mychar") while the block runs; Busy if
        a live job of any process has it already."""
        holder = self.claimed_by()
        if holder:
            raise Busy(busy_message(holder, self.name))
        mine = {"job": job, "pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
        files.write_json(self.busy_path, mine)
        try:
            yield
        finally:
            if files.read_json(self.busy_path, None) == mine:  # never remove another job's claim
                self.busy_path.unlink(missing_ok=True)

    def claimed_by(self) -> str | None:
        """Who works on the project now, quoted for a message ("'train mychar'", with the process when it
        is not this one), or None."""
        try:
            claim = files.read_json(self.busy_path, None)
        except (OSError, ValueError):  # being written, or left half-written by a crash: not a live claim
            return None
        if not isinstance(claim, dict) or not _alive(claim):
            return None
        job = f"'{claim.get('job') or 'a job'}'"
        if claim.get("pid") == os.getpid() and claim.get("host") == socket.gethostname():
            return job
        return f"{job} (in another process, pid {claim.get('pid')})"

    def relative(self, path: Path) -> str:
        return Path(path).resolve().relative_to(self.path.resolve()).as_posix()


def busy_message(holder: str, project: str) -> str:
    """The one refusal of an edit or a job while `holder` (`Project.claimed_by`) works on `project`."""
    return f"{holder} is working on {project!r}: wait for it to finish or stop it first"


def _alive(claim: dict) -> bool:
    """Whether the claiming process still runs (a claim from another machine sharing the folder is
    taken as live: its process cannot be checked from here)."""
    if claim.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(claim.get("pid")), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, TypeError, ValueError):  # another user's live process; a malformed pid
        return isinstance(claim.get("pid"), int)
    return True


def list_projects(root: Path) -> list[str]:
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / "dataset").is_dir() and _NAME.match(p.name))
