"""The real WebUI the integration tests use, when one is given; without it those tests are skipped.

- LORA_MAKER_WEBUI_DIR: the folder of an AUTOMATIC1111 WebUI 1.10.x with its repositories/ in place (its
  environment installed: the tests start it with --skip-prepare-environment and --use-cpu all);
- LORA_MAKER_WEBUI_PYTHON: the Python of its venv;
- LORA_MAKER_CLIP_FILES (optional): the CLIP tokenizer files, by default ../shared/clip-tokenizer/
  clip-files.tar.gz beside the repository.
The tests make their own tiny SD1, SD2-v and SDXL checkpoints and the offline Hugging Face cache the
WebUI builds their text encoders from (tests/webui_models.py, in a temporary folder, once per session),
and never change the WebUI folder. The same for Forge (tests/test_forge_grid.py): LORA_MAKER_FORGE_DIR,
LORA_MAKER_FORGE_PYTHON; optional LORA_MAKER_FORGE_CHECKPOINT (an SD1 checkpoint of the real shape, which
Forge needs, under its folder)."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
WEBUI = os.environ.get("LORA_MAKER_WEBUI_DIR")
PYTHON = os.environ.get("LORA_MAKER_WEBUI_PYTHON")
CLIP_FILES = Path(os.environ.get("LORA_MAKER_CLIP_FILES") or REPO.parent / "shared" / "clip-tokenizer" / "clip-files.tar.gz")
needs_webui = pytest.mark.skipif(not (WEBUI and PYTHON),
                                 reason="no WebUI given (LORA_MAKER_WEBUI_DIR, LORA_MAKER_WEBUI_PYTHON)")
MODEL_KINDS = ("sd1", "sd2v", "sdxl")


@dataclass(frozen=True)
class WebuiModels:
    """The tiny checkpoints (lora-maker-test-<kind>.safetensors + yaml) and the environment a WebUI
    process needs to load them (its offline Hugging Face cache)."""

    folder: Path

    def checkpoint(self, kind: str = "sd1") -> str:
        return str(self.folder / "models" / f"lora-maker-test-{kind}.safetensors")

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "HF_HOME": str(self.folder / "hf"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                "HF_HUB_DISABLE_TELEMETRY": "1", "DO_NOT_TRACK": "1", "GRADIO_ANALYTICS_ENABLED": "False"}

    def run_env(self, work: Path) -> dict[str, str]:
        """`env` for one WebUI run whose caches go to `work` (not the WebUI folder)."""
        return {**self.env, "PYTHONDONTWRITEBYTECODE": "1", "SD_WEBUI_CACHE_FILE": str(work / "cache.json"),
                "SD_WEBUI_CACHE_DIR": str(work / "cache")}


def webui_folder_status() -> str | None:
    """The WebUI folder's files as git sees them (ignored ones too), to prove the tests leave it as they
    found it; None when it is not a git checkout."""
    if not (Path(WEBUI) / ".git").exists():
        return None
    run = subprocess.run(["git", "status", "--porcelain", "--ignored"], cwd=WEBUI, capture_output=True, text=True)
    return run.stdout if run.returncode == 0 else None


def make_webui_models(folder: Path) -> WebuiModels:
    models = WebuiModels(folder)
    run = subprocess.run([PYTHON, str(REPO / "tests" / "webui_models.py"), str(REPO), str(folder), str(CLIP_FILES)],
                         cwd=WEBUI, env=models.env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return models


FORGE = os.environ.get("LORA_MAKER_FORGE_DIR")
FORGE_PYTHON = os.environ.get("LORA_MAKER_FORGE_PYTHON")
FORGE_CHECKPOINT = os.environ.get("LORA_MAKER_FORGE_CHECKPOINT", "models/Stable-diffusion/sd15-random.safetensors")
needs_forge = pytest.mark.skipif(not (FORGE and FORGE_PYTHON),
                                 reason="no Forge given (LORA_MAKER_FORGE_DIR, LORA_MAKER_FORGE_PYTHON)")
