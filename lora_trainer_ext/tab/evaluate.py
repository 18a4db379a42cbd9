"""The Test sub-tab: the project's saved LoRA files, ready to try in txt2img.
(Epoch x weight grids come with the grid renderer.)"""

from __future__ import annotations

import html
from pathlib import Path

from .context import TabContext, shows_errors


def lora_files(folder: Path, name: str) -> list[Path]:
    """The project's LoRA files: its epochs in order, then the final one."""
    if not folder.is_dir():
        return []
    return sorted(folder.glob(f"{name}*.safetensors"), key=lambda p: (p.stem == name, p.stem))


def render(files: list[Path], folder: Path) -> str:
    if not files:
        return f'<p class="lora-maker-note">No LoRA saved yet in {html.escape(str(folder))}: train first.</p>'
    rows = "".join(
        f"<tr><td>{html.escape(p.name)}</td><td>{p.stat().st_size / 2**20:.1f} MB</td>"
        f"<td><code>&lt;lora:{html.escape(p.stem)}:1&gt;</code></td></tr>" for p in files)
    return (f'<p class="lora-maker-note">{html.escape(str(folder))}</p><table class="lora-maker-table">'
            f"<tr><th>file</th><th>size</th><th>in a prompt</th></tr>{rows}</table>")


def build(ctx: TabContext) -> None:
    import gradio as gr

    files = gr.HTML(elem_id="lora_maker_test_files")
    refresh = gr.Button("Refresh", elem_id="lora_maker_test_refresh")

    @shows_errors
    def show(name):
        if not name:
            return ""
        folder = ctx.studio.lora_dir(ctx.open(name).name)
        return render(lora_files(folder, name), folder)

    for event in (ctx.project.change, ctx.job_event.change, refresh.click):
        event(show, ctx.project, files, queue=False)
