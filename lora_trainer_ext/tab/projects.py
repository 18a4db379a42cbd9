"""The project picker above the sub-tabs: choose a project or create one."""

from __future__ import annotations

from ..studio import Studio
from .context import shows_errors


def initial_project(studio: Studio) -> str | None:
    """What a (re)loaded page shows: the running job's project, else the last one picked, else the first."""
    job = studio.jobs.current()
    names = studio.projects()
    for name in (job.project if job and job.state == "running" else None, studio.last_project):
        if name in names:
            return name
    return names[0] if names else None


def build(studio: Studio, blocks):
    """The picker; returns the project dropdown the sub-tabs listen to."""
    import gradio as gr

    with gr.Row(elem_id="lora_maker_project_row"):
        # Empty until the page has loaded: setting it then fires `change` on every page load, so each
        # sub-tab shows the project without a load hook of its own.
        project = gr.Dropdown(label="Project", choices=studio.projects(), value=None, elem_id="lora_maker_project",
                              scale=3)
        refresh = gr.Button("\U0001f504", elem_id="lora_maker_project_refresh", elem_classes="tool", scale=0,
                            min_width=40)
        new_name = gr.Textbox(label="New project", placeholder="name: letters, digits, _ - .", scale=2,
                              elem_id="lora_maker_new_project")
        create = gr.Button("Create", elem_id="lora_maker_create_project", scale=0, min_width=80)

    def listed(value):
        return gr.Dropdown.update(choices=studio.projects(), value=value)

    @shows_errors
    def create_project(name):
        name = (name or "").strip()
        studio.project(name, create=True)
        studio.last_project = name
        return listed(name), ""

    def remember(name):
        studio.last_project = name or None

    refresh.click(lambda value: listed(value), project, project, queue=False)
    blocks.load(lambda: listed(initial_project(studio)), None, project, queue=False)
    create.click(create_project, new_name, [project, new_name], queue=False)
    new_name.submit(create_project, new_name, [project, new_name], queue=False)
    project.change(remember, project, None, queue=False)
    return project
