"""Where projects and downloaded models live by default.

Inside a WebUI install (this package at `<webui>/extensions/<ext>/lora_trainer_ext`) the defaults sit
in the WebUI folder, next to everything else the user has, and the WebUI's own settings
(`config.json`) can move them; headless, they sit in the home folder. Environment variables beat both.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

# Keys of the WebUI settings (Settings > LoRA Maker) that the tab registers and the CLI honours too.
OPT_PROJECTS_ROOT = "lora_maker_projects_root"
OPT_MODEL_CACHE = "lora_maker_model_cache"
OPT_DEFAULT_TAGGER = "lora_maker_tagger"
OPT_TAG_THRESHOLD = "lora_maker_tag_threshold"
OPT_TAG_CHARACTER_THRESHOLD = "lora_maker_tag_character_threshold"
OPT_DEFAULT_PRESET = "lora_maker_default_preset"


def webui_root() -> Path | None:
    """The WebUI folder this extension is installed in, or None when it runs elsewhere."""
    package = Path(__file__).resolve().parent
    extensions = package.parent.parent
    if extensions.name == "extensions" and (extensions.parent / "webui.py").is_file():
        return extensions.parent
    return None


def webui_settings() -> dict:
    root = webui_root()
    if root is None:
        return {}
    try:
        return json.loads((root / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _default(env: str, option: str, in_webui: str, headless: Path) -> Path:
    if os.environ.get(env):
        return Path(os.environ[env]).expanduser()
    configured = webui_settings().get(option)
    if configured:
        return Path(configured).expanduser()
    root = webui_root()
    return root / in_webui if root else headless


def default_projects_root() -> Path:
    """`$LORA_MAKER_ROOT`, the WebUI setting, `<webui>/lora-maker`, or `~/lora-maker`."""
    return _default("LORA_MAKER_ROOT", OPT_PROJECTS_ROOT, "lora-maker", Path.home() / "lora-maker")


def default_model_cache() -> Path:
    """`$LORA_MAKER_CACHE`, the WebUI setting, `<webui>/models/lora-maker`, or `~/.cache/lora-maker`."""
    return _default("LORA_MAKER_CACHE", OPT_MODEL_CACHE, "models/lora-maker", Path.home() / ".cache" / "lora-maker")


def default_lora_dir(project_name: str, projects_root: Path) -> Path:
    """Where a project's LoRA files go: the WebUI's Lora folder (a subfolder per project, so its
    cards group them), or headless the project's own output/ folder."""
    root = webui_root()
    if root is not None:
        return root / "models" / "Lora" / project_name
    return Path(projects_root) / project_name / "output"
