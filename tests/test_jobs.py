"""Training as a background job, watched by polling: the real trainer on the tiny SD1 host."""

from __future__ import annotations

import threading

import pytest
from conftest import add_image
from test_trainer import settings
from tiny_hosts import make_checkpoint

from lora_trainer_ext.errors import LoraMakerError
from lora_trainer_ext.hosts.standalone import load_checkpoint
from lora_trainer_ext.jobs import DONE, FAILED, RUNNING, STOPPED, JobRunner
from lora_trainer_ext.training.trainer import Result, train

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("model"), "sd1")


def training(project, checkpoint, lora_dir, **changes):
    def work(control, on_status):
        return train(project, load_checkpoint(checkpoint), settings(**changes), lora_dir, control=control,
                     on_status=on_status)

    return work


def test_a_job_runs_in_the_background_under_the_guard_and_reports(project, checkpoint, tmp_path):
    for i in range(2):
        add_image(project, f"{i}.png", "mychar, 1girl", size=(64, 64), seed=i)
    gpu = threading.Lock()  # stands where the WebUI's queue lock goes
    seen = []

    def observe(job):
        seen.append((job.state, job.status.phase if job.status else None, gpu.locked()))

    runner = JobRunner(guard=lambda job: gpu, observe=observe)
    job = runner.start("train demo", project.name, training(project, checkpoint, tmp_path / "lora", epochs=1))
    assert job.snapshot()["state"] == RUNNING and runner.current() is job
    runner.wait(240)
    snap = job.snapshot()
    assert snap["state"] == DONE and snap["error"] == "" and snap["files"][-1].endswith("demo.safetensors")
    assert [step for step, _ in snap["losses"]] == [1, 2] and snap["status"]["phase"] == "done"
    assert all(locked for state, phase, locked in seen if state == RUNNING)  # all work ran holding the guard
    assert not gpu.locked() and seen[-1][0] == DONE


def test_one_job_at_a_time_and_stop(tmp_path):
    release = threading.Event()

    def waits(control, on_status):
        while not control.stop_requested:
            release.wait(0.01)
        return Result(stopped=True)

    runner = JobRunner()
    runner.start("train a", "a", waits)
    with pytest.raises(LoraMakerError, match="'train a' is still running"):
        runner.start("train b", "b", waits)
    runner.stop(save=True)
    job = runner.wait(10)
    assert job.state == STOPPED and job.control.save_on_stop
    assert runner.start("train b", "b", lambda control, on_status: Result()).title == "train b"  # free again
    assert runner.wait(10).state == DONE


def test_failures_are_reported_not_raised(project, checkpoint, tmp_path):
    runner = JobRunner()
    runner.start("train demo", project.name, training(project, checkpoint, tmp_path / "lora"))
    job = runner.wait(60)
    assert job.state == FAILED and "no images" in job.error and job.finished_at


def test_library_progress_becomes_job_statuses_and_stop_ends_the_job_stopped(tmp_path):
    from lora_trainer_ext.errors import Stopped
    from lora_trainer_ext.jobs import JobProgress

    guarded = []
    runner = JobRunner(guard=lambda job: guarded.append(job.id) or threading.Lock())
    release = threading.Event()

    def download(control, on_status):
        progress = JobProgress(control, on_status)
        with progress.task("downloading", 3) as task:
            for i in range(3):
                task.advance(note=f"#{i}")
                if i == 1:
                    release.wait(10)
                if progress.should_stop():
                    raise Stopped("stopped by the user")
        return Result()

    job = runner.start("scrape demo", "demo", download, kind="scrape", gpu=False)
    for _ in range(500):
        if job.status and job.status.step == 2:
            break
        release.wait(0.01)
    snap = job.snapshot()
    assert snap["kind"] == "scrape" and snap["status"]["phase"] == "downloading"
    assert (snap["status"]["step"], snap["status"]["total_steps"], snap["status"]["message"]) == (2, 3, "#1")
    runner.stop()
    release.set()
    job = runner.wait(10)
    assert job.state == STOPPED and job.summary == "stopped by the user" and not job.error
    assert guarded == []  # not a GPU job: the WebUI's queue lock stays free for txt2img
    assert job.task_id.startswith(f"task(lora-maker-{job.id}-")
