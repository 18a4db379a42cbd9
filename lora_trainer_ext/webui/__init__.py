"""The WebUI adapter: the only part of LoRA Maker that imports the WebUI's `modules.*`.

`scripts/lora_maker.py` calls `register()` when the WebUI loads the extension; everything else in the
package runs (and is tested) without a WebUI."""

from __future__ import annotations


def register() -> None:
    from modules import script_callbacks

    from .settings import add_settings

    script_callbacks.on_ui_settings(add_settings, name="lora_maker_settings")
