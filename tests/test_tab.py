"""The tab's views that need no browser: the job panel, the loss chart, the saved-files list, the picker."""

from __future__ import annotations

import re

from lora_trainer_ext.jobs import Job, JobRunner
from lora_trainer_ext.progress import Status
from lora_trainer_ext.tab import evaluate_view, job_panel, projects


def test_the_loss_chart_spans_the_steps_and_losses_and_thins_long_runs():
    losses = [(step, 1.0 / step) for step in range(1, 2001)]
    svg = job_panel.loss_chart(losses)
    points = re.search(r'points="([^"]+)"', svg).group(1).split()
    assert 300 <= len(points) <= 401  # thinned for the browser, the last point kept
    xs, ys = zip(*((float(a), float(b)) for a, b in (p.split(",") for p in points)))
    assert xs == tuple(sorted(xs)) and min(xs) == 60 and max(xs) == 600 - 16
    assert ys[0] == 16 and max(ys) == 160 - 32  # highest loss at the top, lowest at the bottom
    assert ">step 1<" in svg and ">step 2000<" in svg and ">1.0000<" in svg and ">0.0005<" in svg
    assert job_panel.loss_chart([(1, 0.5)]) == "" and job_panel.loss_chart([(1, float("nan")), (2, 0.1)]) == ""


def test_the_panel_shows_a_training_jobs_numbers_and_escapes_text():
    job = Job(7, "train <mine>", "mine")
    job.status = Status("training", step=30, total_steps=120, epoch=2, epochs=4, loss=0.1234, lr=5e-4,
                        it_per_s=1.5, eta_s=61, peak_memory_gb=5.25)
    job.losses = [(i, 0.2 - i / 1000) for i in range(1, 31)]
    html = job_panel.render(job.snapshot())
    assert 'data-state="running"' in html and 'data-kind="train"' in html and 'data-job="7"' in html
    assert "train &lt;mine&gt;" in html and "<mine>" not in html
    for fact in ("30/120", "epoch 2/4", "loss 0.1234", "lr 5.00e-04", "1.50 it/s", "ETA 1:01", "peak VRAM 5.2 GB"):
        assert fact in html
    assert 'style="width:25.0%"' in html and "lora-maker-loss-chart" in html
    job.state, job.error = "failed", "out of memory: lower batch_size"
    html = job_panel.render(job.snapshot())
    assert "ETA" not in html and "out of memory: lower batch_size" in html and 'data-state="failed"' in html
    assert 'data-state="idle"' in job_panel.render(None)


def test_saved_loras_list_epochs_in_order_then_the_final_file(tmp_path):
    from lora_trainer_ext.headless import standalone_studio

    studio = standalone_studio(root=tmp_path / "projects", lora_dir=tmp_path / "lora")
    folder = studio.lora_dir("mine")
    folder.mkdir(parents=True)
    for name in ("mine-000002", "mine", "mine-000001", "mine2-000001", "other"):
        (folder / f"{name}.safetensors").write_bytes(b"x" * 10)
    files = studio.saved_loras("mine")
    assert [p.stem for p in files] == ["mine-000001", "mine-000002", "mine"]
    html = evaluate_view.files_html(files, folder)
    assert "&lt;lora:mine-000002:1&gt;" in html and "other" not in html
    assert "train first" in evaluate_view.files_html([], tmp_path / "nothing")
    assert studio.saved_loras("nothing") == []


def test_a_reloaded_page_shows_the_running_jobs_project(tmp_path):
    from lora_trainer_ext.headless import standalone_studio

    studio = standalone_studio(root=tmp_path)
    assert projects.initial_project(studio) is None
    for name in ("a", "b", "c"):
        studio.project(name, create=True)
    assert projects.initial_project(studio) == "a"
    studio.last_project = "b"
    assert projects.initial_project(studio) == "b"
    studio.jobs = JobRunner()
    import threading

    release = threading.Event()
    studio.jobs.start("scrape c", "c", lambda control, on_status: release.wait(10), kind="scrape", gpu=False)
    try:
        assert projects.initial_project(studio) == "c"
    finally:
        release.set()
        studio.jobs.wait(10)
    assert projects.initial_project(studio) == "b"
