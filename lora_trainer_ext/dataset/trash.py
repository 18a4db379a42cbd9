"""Nothing in a dataset is ever deleted: removed images go to the project's trash/ with their captions,
and a manifest remembers where each came from and why, so it can be restored."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from .. import files
from ..errors import LoraMakerError
from ..project import Project


@dataclass
class TrashEntry:
    name: str  # file name inside trash/
    original: str  # file name it had in dataset/
    reason: str
    time: str


def _manifest_path(project: Project) -> Path:
    return project.trash_dir / "manifest.json"


def _manifest(project: Project) -> dict:
    return files.read_json(_manifest_path(project), {}) or {}


def _move_with_caption(image: Path, target: Path) -> None:
    caption = Project.caption_path(image)
    files.move(image, target)
    if caption.exists():
        files.move(caption, Project.caption_path(target))


def move_to_trash(project: Project, reasons: dict[Path, str]) -> list[TrashEntry]:
    """Move each image (and its .txt caption) from dataset/ to trash/, remembering why."""
    manifest = _manifest(project)
    moved = []
    for image, reason in reasons.items():
        image = Path(image)
        if image.parent.resolve() != project.dataset_dir.resolve() or not image.is_file():
            raise LoraMakerError(f"{image.name} is not an image of project {project.name!r}")
        target = files.free_path(project.trash_dir / image.name, sidecars=(".txt",))
        _move_with_caption(image, target)
        entry = TrashEntry(target.name, image.name, reason, time.strftime("%Y-%m-%d %H:%M:%S"))
        manifest[target.name] = {"original": entry.original, "reason": reason, "time": entry.time}
        moved.append(entry)
    files.write_json(_manifest_path(project), manifest)
    return moved


def list_trash(project: Project) -> list[TrashEntry]:
    manifest = _manifest(project)
    return [TrashEntry(name, **info) for name, info in sorted(manifest.items()) if (project.trash_dir / name).exists()]


def trashed_originals(project: Project) -> set[str]:
    """Names of dataset images that are in the trash (a scrape must not bring them back)."""
    return {entry.original for entry in list_trash(project)}


def restore(project: Project, names: list[str] | None = None) -> list[Path]:
    """Move trashed images back to dataset/ (all when `names` is None), under their old names when free."""
    manifest = _manifest(project)
    entries = {e.name: e for e in list_trash(project)}
    wanted = list(entries) if names is None else names
    unknown = [n for n in wanted if n not in entries]
    if unknown:
        raise LoraMakerError(f"not in the trash of {project.name!r}: {', '.join(unknown)}")
    restored = []
    for name in wanted:
        target = files.free_path(project.dataset_dir / entries[name].original, sidecars=(".txt",))
        _move_with_caption(project.trash_dir / name, target)
        manifest.pop(name)
        restored.append(target)
    files.write_json(_manifest_path(project), manifest)
    return restored
