"""The Train sub-tab (being built)."""

from __future__ import annotations

from .context import TabContext


def build(ctx: TabContext) -> None:
    import gradio as gr

    gr.Markdown("Train", elem_id="lora_maker_train_placeholder")
