"""Shared fixtures: a project in a temporary projects root, and real images to put in it."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
from PIL import Image

from lora_trainer_ext.project import Project

# A model download nobody meant (a default tagger, say) must fail fast on a closed loopback port, never
# reach the hub: tests that download serve their own hub and say so explicitly.
os.environ.setdefault("HF_ENDPOINT", "http://127.0.0.1:9")  # port 9 (discard): nothing listens

pytest_plugins = ("browser",)  # the browser tests' fixtures: one Chromium for the whole session


def image_bytes(size=(96, 64), fmt="PNG", color=None, seed=0, mode="RGB", **save) -> bytes:
    """A real encoded image: smooth random content (or a flat `color`)."""
    if color is None:
        rng = np.random.default_rng(seed)
        small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize(size, Image.BICUBIC)
    else:
        img = Image.new("RGB", size, color)
    img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, fmt, **save)
    return buf.getvalue()


@pytest.fixture
def project(tmp_path) -> Project:
    return Project.open(tmp_path / "projects", "demo", create=True)


def add_image(project: Project, name: str, caption: str | None = None, **kw) -> "Path":
    path = project.dataset_dir / name
    fmt = {".jpg": "JPEG", ".png": "PNG", ".webp": "WEBP"}[path.suffix]
    path.write_bytes(image_bytes(fmt=fmt, **kw))
    if caption is not None:
        Project.caption_path(path).write_text(caption, encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def webui_models(tmp_path_factory):
    """The real-WebUI tests' tiny checkpoints (tests/webui_env.py), made once per session."""
    from webui_env import make_webui_models

    return make_webui_models(tmp_path_factory.mktemp("webui-models"))
