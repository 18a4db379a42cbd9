"""A stopped run's resumable state: <project>/train/state.pt (network, optimizer, scheduler, RNG, step,
the settings and what they ran on), and what resume compares before it continues.

Resume compares the settings that change what is learned, after migrating the saved ones to this
release (`migrations.py`): a release that adds a setting with a default, or a change of how often
epochs are saved, does not strand a stopped run.
"""

from __future__ import annotations

import io
from dataclasses import fields
from pathlib import Path

from .. import files, migrations
from ..errors import LoraMakerError
from ..project import Project
from .settings import TrainSettings

STATE_FILE = "state.pt"
# Settings that change when or where files are written, or how memory is spent, not what is learned.
NOT_LEARNED = frozenset({"save_every_n_epochs", "keep_last_n_epochs", "cache_latents", "gradient_checkpointing",
                         "save_precision"})


def state_dir(project: Project) -> Path:
    return project.path / "train"


def state_path(project: Project) -> Path:
    return state_dir(project) / STATE_FILE


def has_state(project: Project) -> bool:
    """Whether a stopped run of `project` can be resumed (a finished run deletes its state)."""
    return state_path(project).is_file()


def write_state(project: Project, state: dict) -> None:
    import torch

    buffer = io.BytesIO()
    torch.save({**state, "settings_version": migrations.VERSION}, buffer)
    files.write_bytes(state_path(project), buffer.getvalue())


def read_state(project: Project) -> dict:
    """The saved state, its settings migrated to this release's names."""
    import torch

    path = state_path(project)
    if not path.is_file():
        raise LoraMakerError(f"nothing to resume: no saved training state in {path.parent}")
    # torch.serialization.load, not torch.load: the WebUI swaps torch.load for a checker that refuses
    # current torch's archive layout (and returns None); this file is our own.
    state = torch.serialization.load(path, map_location="cpu", weights_only=False)
    state["settings"] = migrations.migrate_train(dict(state.get("settings") or {}), state.get("settings_version", 1),
                                                 f"the stopped run's settings in {path}")
    return state


def changed_settings(saved: dict, current: TrainSettings, kind: str, project: Project) -> list[str]:
    """The settings that change what is learned and differ between a stopped run (`saved`, migrated;
    a setting it lacks counts as its default) and `current` (both resolved for a model of `kind`)."""
    try:
        before = TrainSettings.from_dict(saved).resolved(kind, project)
    except LoraMakerError as e:
        raise LoraMakerError(f"the stopped run's settings cannot be read ({e}): start a new run") from None
    return [f.name for f in fields(TrainSettings)
            if f.name not in NOT_LEARNED and getattr(before, f.name) != getattr(current, f.name)]
