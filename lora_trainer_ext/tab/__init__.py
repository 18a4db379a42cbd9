"""The "LoRA Maker" tab: gradio 3.41 (the WebUI's), built over a `Studio`.

One builder serves the WebUI (`webui/`, through `on_ui_tabs`) and the standalone app (`app.py`), so the
browser tests exercise exactly what WebUI users get. Sub-tabs follow the workflow: Dataset, Train,
Test. Above them sit the project picker and the job panel, which the page polls (javascript/
lora_maker.js), so long jobs survive a dropped websocket and a reloaded page re-attaches to them.
May import: the Studio and what it returns, and the libraries' pure helpers (parsing, views); every
action goes through the Studio, so the tab refuses and reports exactly what the API and the CLI do.
Never the WebUI's modules (the WebUI's own buttons come in through `Studio.paste_to_txt2img`).
"""

from __future__ import annotations

import html

from ..studio import Studio
from .context import TabContext


def build_tab(studio: Studio):
    """The tab's `gr.Blocks` (the WebUI shows it as `#tab_lora_maker`)."""
    import gradio as gr

    from . import dataset, evaluate, job_panel, projects, train

    with gr.Blocks(analytics_enabled=False) as blocks:
        problem = studio.host_problem()
        if problem:  # training and grids are off (their buttons too), the dataset work is not
            gr.HTML(f'<p class="lora-maker-error">{html.escape(problem)}</p>', elem_id="lora_maker_host_problem")
        project = projects.build(studio, blocks)
        job_event = job_panel.build(studio, blocks)
        ctx = TabContext(studio, project, job_event)
        with gr.Tabs(elem_id="lora_maker_tabs"):
            with gr.Tab("Dataset", elem_id="lora_maker_dataset_tab"):
                dataset.build(ctx)
            # Train and Test also refresh when opened: what the Dataset sub-tab changed shows there.
            with gr.Tab("Train", elem_id="lora_maker_train_tab") as train_tab:
                train.build(ctx, train_tab)
            with gr.Tab("Test", elem_id="lora_maker_test_tab") as test_tab:
                evaluate.build(ctx, test_tab)
    return blocks
