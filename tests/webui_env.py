"""The real WebUI the integration tests use, when one is given: LORA_MAKER_WEBUI_DIR (its folder) and
LORA_MAKER_WEBUI_PYTHON (its venv's Python); optional LORA_MAKER_WEBUI_CHECKPOINT (a small SD1
checkpoint under its folder). Without them those tests are skipped. The same for Forge
(tests/test_forge_grid.py): LORA_MAKER_FORGE_DIR, LORA_MAKER_FORGE_PYTHON; optional LORA_MAKER_FORGE_CHECKPOINT
(an SD1 checkpoint of the real shape, which Forge needs, under its folder)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
WEBUI = os.environ.get("LORA_MAKER_WEBUI_DIR")
PYTHON = os.environ.get("LORA_MAKER_WEBUI_PYTHON")
CHECKPOINT = os.environ.get("LORA_MAKER_WEBUI_CHECKPOINT", "models/Stable-diffusion/tiny-sd1-blocks.safetensors")
needs_webui = pytest.mark.skipif(not (WEBUI and PYTHON),
                                 reason="no WebUI given (LORA_MAKER_WEBUI_DIR, LORA_MAKER_WEBUI_PYTHON)")

FORGE = os.environ.get("LORA_MAKER_FORGE_DIR")
FORGE_PYTHON = os.environ.get("LORA_MAKER_FORGE_PYTHON")
FORGE_CHECKPOINT = os.environ.get("LORA_MAKER_FORGE_CHECKPOINT", "models/Stable-diffusion/sd15-random.safetensors")
needs_forge = pytest.mark.skipif(not (FORGE and FORGE_PYTHON),
                                 reason="no Forge given (LORA_MAKER_FORGE_DIR, LORA_MAKER_FORGE_PYTHON)")
