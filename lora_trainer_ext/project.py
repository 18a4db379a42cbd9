"""A project: one LoRA's folder under the projects root.

    <root>/<name>/
        dataset/        image + same-name .txt caption pairs (what the trainer reads)
        trash/          removed images and their captions, restorable (trash.py)
        history/        every caption edit, undoable (history.py)
        settings.json   activation tags, keep_tokens, tagger and training settings
        .cache/         derived data that can be rebuilt (image hashes)
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from . import files
from .dataset.images import IMAGE_EXTS
from .errors import LoraMakerError

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
        return files.read_json(self.settings_path, {}) or {}

    def settings_text(self, **sections: dict) -> str:
        """The settings file's text with `sections` merged in (written through the history, so undoable)."""
        settings = self.settings()
        for section, values in sections.items():
            settings.setdefault(section, {}).update(values)
        return json.dumps(settings, indent=2, ensure_ascii=False) + "\n"

    def update_settings(self, **sections: dict) -> None:
        files.write_text(self.settings_path, self.settings_text(**sections))

    def relative(self, path: Path) -> str:
        return Path(path).resolve().relative_to(self.path.resolve()).as_posix()


def list_projects(root: Path) -> list[str]:
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / "dataset").is_dir() and _NAME.match(p.name))
