"""What every sub-tab builder gets, and the one way handlers report errors."""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from typing import Any, Callable

from ..errors import LoraMakerError
from ..project import Project
from ..studio import Studio


@dataclass
class TabContext:
    studio: Studio
    project: Any  # gr.Dropdown: the selected project's name ("" or None when there is none)
    job_event: Any  # hidden gr.Textbox: "<job id>:<state>"; changes when a job starts or ends

    def open(self, name: str | None) -> Project:
        """The selected project, or a clear error when none is selected."""
        if not name:
            raise LoraMakerError("pick a project first (or create one with New project)")
        return self.studio.project(name)


def shows_errors(fn: Callable) -> Callable:
    """A handler whose LoraMakerError or OSError shows as the WebUI's error toast, not a stack trace."""
    import gradio as gr

    @functools.wraps(fn)
    def handler(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except LoraMakerError as e:
            raise gr.Error(str(e)) from None
        except OSError as e:
            raise gr.Error(f"{e.strerror or e}{f': {e.filename}' if e.filename else ''}") from None

    return handler


def unavailable(modules: tuple[str, ...], explain: Callable[[], object]) -> str | None:
    """Why a feature can't run in this Python (one of `modules` is not installed), or None. `explain`
    is the feature's own import check, so the message (with its install hint) is the one the
    feature itself would raise."""
    if all(importlib.util.find_spec(m) is not None for m in modules):
        return None
    try:
        explain()
    except LoraMakerError as e:
        return str(e)
    return None
