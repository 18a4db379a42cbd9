"""The tab's frame in a real headless Chromium: the project picker, and the job panel driven by polling
(a reloaded page re-attaches to the running job; Stop works from the panel)."""

from __future__ import annotations

import threading

from browser import create_project

from lora_trainer_ext.headless import standalone_studio
from lora_trainer_ext.progress import Status
from lora_trainer_ext.training.trainer import Result


def test_projects_are_created_and_picked_and_bad_names_are_refused(open_ui, tmp_path):
    studio = standalone_studio(root=tmp_path / "projects")
    studio.project("existing", create=True)
    ui = open_ui(studio)
    page = ui.page
    page.wait_for_function("document.querySelector('#lora_maker_project input').value === 'existing'")
    create_project(page, "mychar")
    assert (tmp_path / "projects" / "mychar" / "dataset").is_dir()
    ui.shot("created")
    page.fill("#lora_maker_new_project textarea", "../escape")
    page.click("#lora_maker_create_project")
    page.wait_for_selector(".toast-body:has-text('invalid project name')")
    ui.shot("refused")
    assert not (tmp_path / "escape").exists() and studio.projects() == ["existing", "mychar"]
    assert all("cdnjs.cloudflare.com" in url for url in ui.blocked)  # gradio's own iframe script, nothing else


def test_the_job_panel_follows_a_job_survives_a_reload_and_stops_it(open_ui, tmp_path):
    studio = standalone_studio(root=tmp_path / "projects")
    studio.project("mychar", create=True)
    tick = threading.Event()  # never set: a 50 ms pause per step

    def fake_training(control, on_status):
        for i in range(1, 1000):  # reports like the trainer until stopped
            on_status(Status("training", step=i, total_steps=1000, epoch=1, epochs=10, loss=1 / i, lr=1e-4,
                             it_per_s=5.0, eta_s=200.0))
            if control.stop_requested:
                return Result(stopped=True)
            tick.wait(0.05)
        return Result()

    ui = open_ui(studio)
    page = ui.page
    studio.jobs.start("train mychar", "mychar", fake_training)
    page.wait_for_selector("#lora_maker_job_status[data-state=running] .lora-maker-loss-chart")
    page.wait_for_selector("#lora_maker_job_stop", state="visible")
    assert "epoch 1/10" in page.inner_text("#lora_maker_job_status")
    ui.shot("running")
    page.reload()  # a new page load: nothing but polling brings the job back
    page.wait_for_selector("#lora_maker_job_status[data-state=running]")
    page.wait_for_function("document.querySelector('#lora_maker_project input').value === 'mychar'")
    first = int(page.get_attribute("#lora_maker_job_status", "data-job"))
    ui.shot("reattached")
    page.click("#lora_maker_job_stop_save")
    page.wait_for_selector("#lora_maker_job_status[data-state=stopped]")
    job = studio.jobs.wait(10)
    assert job.id == first and job.control.stop_requested and job.control.save_on_stop
    page.wait_for_selector("#lora_maker_job_stop", state="hidden")
    ui.shot("stopped")
