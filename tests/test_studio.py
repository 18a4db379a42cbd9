"""The Studio is the one service behind the tab, the API and the CLI: they refuse the same busy edit
with the same message (a job of this process or of another one), and report the same plan as the
trainer counts it (per aspect-ratio bucket)."""

from __future__ import annotations

import subprocess
import sys
import threading

import gradio as gr
import httpx
import pytest
from conftest import add_image
from test_api import serve
from test_cli import REPO, run
from tiny_hosts import make_checkpoint

from lora_trainer_ext.api import PREFIX
from lora_trainer_ext.errors import Busy, LoraMakerError
from lora_trainer_ext.headless import standalone_studio
from lora_trainer_ext.project import busy_message
from lora_trainer_ext.tab import build_tab
from lora_trainer_ext.training.settings import TrainSettings

pytestmark = pytest.mark.timeout(240)
EDIT = ("demo", "0.png")


@pytest.fixture
def studio(tmp_path):
    studio = standalone_studio(root=tmp_path / "projects", lora_dir=tmp_path / "lora", model_cache=tmp_path / "cache")
    project = studio.project("demo", create=True)
    for i in range(2):
        add_image(project, f"{i}.png", "mychar, 1girl", size=(64, 64), seed=i)
    return studio


def tab_handler(blocks, name: str):
    """The tab's own event handler `name` (as gradio calls it on a click)."""
    found = [f.fn for f in blocks.fns if getattr(f.fn, "__name__", "") == name]
    assert len(found) == 1, name
    return found[0]


def tab_refusal(studio) -> str:
    save_caption = tab_handler(build_tab(studio), "save_caption")
    with pytest.raises(gr.Error) as refused:
        save_caption(*EDIT, "edited in the tab")
    return refused.value.message  # what the WebUI's toast shows


def api_refusal(studio) -> str:
    with serve(studio) as port, httpx.Client(base_url=f"http://127.0.0.1:{port}{PREFIX}", timeout=60) as api:
        reply = api.put("/projects/demo/captions/0.png", json={"caption": "edited by the API"})
    assert reply.status_code == 409
    return reply.json()["error"]


def cli_refusal(studio) -> str:
    result = run("tags", EDIT[0], "--set", EDIT[1], "edited by the CLI", root=studio.projects_root())
    assert result.returncode == 1 and result.stderr.startswith("error: "), result.stderr
    return result.stderr.strip().removeprefix("error: ")


def caption(studio) -> str:
    return (studio.project("demo").dataset_dir / "0.txt").read_text(encoding="utf-8")


def test_a_job_of_this_process_refuses_the_tab_and_the_api_edit_with_one_message(studio):
    release = threading.Event()
    studio._start("tag demo", studio.project("demo"), lambda control, on_status: release.wait(60), kind="tag")
    try:
        expected = busy_message("'tag demo'", "demo")
        assert tab_refusal(studio) == expected
        assert api_refusal(studio) == expected
        with pytest.raises(Busy, match="'tag demo' is working on 'demo'"):
            studio.start_captioning("demo")
        studio.project("other", create=True)
        with pytest.raises(Busy, match="'tag demo' is still running"):  # one job at a time, on any project
            studio.start_captioning("other")
    finally:
        release.set()
        studio.jobs.wait(30)
    assert caption(studio) == "mychar, 1girl"
    assert studio.set_caption(*EDIT, "edited after the job") and caption(studio) == "edited after the job"


def test_a_job_of_another_process_refuses_the_tab_the_api_and_the_cli_alike(studio):
    # another process (the WebUI, or a CLI run) holding the project as its jobs do
    code = ("import sys; from lora_trainer_ext.project import Project; "
            f"p = Project({str(studio.projects_root())!r}, 'demo')\n"
            "with p.claim('train demo'):\n    print('held', flush=True); sys.stdin.readline()")
    other = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True)
    try:
        assert other.stdout.readline().strip() == "held"
        expected = busy_message(f"'train demo' (in another process, pid {other.pid})", "demo")
        assert tab_refusal(studio) == expected
        assert api_refusal(studio) == expected
        assert cli_refusal(studio) == expected
        with pytest.raises(Busy) as refused:  # nor may a job of this process start on it
            studio.start_tagging("demo")
        assert str(refused.value) == expected
    finally:
        other.communicate("\n", timeout=30)
    assert caption(studio) == "mychar, 1girl"
    assert not studio.project("demo").busy_path.exists()  # the claim went with its job


def test_a_claim_of_a_process_that_died_does_not_lock_the_project(studio):
    other = subprocess.run([sys.executable, "-c", (
        "import os; from lora_trainer_ext.project import Project; "
        f"p = Project({str(studio.projects_root())!r}, 'demo'); held = p.claim('train demo'); held.__enter__(); os._exit(0)")],
        cwd=REPO, timeout=60)
    assert other.returncode == 0 and studio.project("demo").busy_path.exists()  # killed: left behind
    assert studio.project("demo").claimed_by() is None
    assert studio.set_caption(*EDIT, "edited") and studio.can_resume("demo") is False


# -- one plan ---------------------------------------------------------------------------------------

# Ten aspect ratios, three images each: at batch 4 a bucket's 3 x 10 repeats fill 8 batches (a batch holds
# one bucket), 80 an epoch, where images x repeats / batch alone would say ceil(30 x 10 / 4) = 75.
SIZES = [(64, 64), (72, 56), (56, 72), (80, 48), (48, 80), (88, 40), (40, 88), (96, 32), (32, 96), (128, 32)]
SETTINGS = {"resolution": 512, "repeats": 10, "epochs": 10, "batch_size": 4}  # buckets by aspect ratio at 512 px


@pytest.fixture
def buckets(tmp_path):
    checkpoint = make_checkpoint(tmp_path / "model", "sd1")
    studio = standalone_studio(checkpoint, root=tmp_path / "projects", lora_dir=tmp_path / "lora")
    project = studio.project("buckets", create=True)
    for i, size in enumerate(SIZES * 3):
        add_image(project, f"{i:02d}.png", "mychar, 1girl", size=size, seed=i)
    studio.save_training_settings("buckets", TrainSettings.from_dict(SETTINGS))
    return studio, checkpoint


def test_the_tab_the_api_the_cli_and_the_trainer_count_the_same_steps(buckets):
    studio, checkpoint = buckets
    plan = studio.training_plan("buckets")
    assert plan.buckets == 10 and plan.steps.steps_per_epoch == 80 and plan.steps.total_steps == 800
    line = plan.steps.render()
    assert line == "30 images x 10 repeats x 10 epochs / batch 4 = 750 steps (800 with batches filled per bucket)"

    blocks = build_tab(studio)
    shown, _ = tab_handler(blocks, "reopened")("buckets", "buckets",
                                               *[v for v in _form_values(studio.training_settings("buckets"))])
    assert 'data-steps="800"' in shown

    with serve(studio) as port, httpx.Client(base_url=f"http://127.0.0.1:{port}{PREFIX}", timeout=60) as api:
        answer = api.get("/projects/buckets/train/plan").json()
    assert answer["total_steps"] == 800 and answer["line"] == line and answer["buckets"] == 10

    cli = run("plan", "buckets", root=studio.projects_root())
    assert cli.returncode == 0 and cli.stdout.splitlines()[0] == line, cli.stderr

    planned = []  # the trainer's own count, in its "plan" status (then it is stopped)

    def observe(job):
        if job.status is not None and job.status.phase == "plan":
            planned.append(job.status)
            job.control.stop()

    studio = standalone_studio(checkpoint, root=studio.projects_root(), lora_dir=studio.lora_dir(""), observe=observe)
    job = studio.start_training("buckets")
    studio.jobs.wait(120)
    assert planned and planned[0].total_steps == 800 and planned[0].message.splitlines()[0] == line, job.error


def _form_values(settings):
    from lora_trainer_ext.tab.train_form import form_values

    return form_values(settings)


def test_stop_while_caching_latents_ends_the_job_as_stopped(buckets):
    _, checkpoint = buckets
    root = buckets[0].projects_root()

    def observe(job):
        if job.status is not None and job.status.phase == "caching latents":
            job.control.stop()

    studio = standalone_studio(checkpoint, root=root, lora_dir=root.parent / "lora", observe=observe)
    job = studio.start_training("buckets")
    studio.jobs.wait(120)
    assert job.state == "stopped" and job.error == "" and "caching latents" in job.summary, (job.state, job.error)
    assert studio.saved_loras("buckets") == [] and not studio.project("buckets").busy_path.exists()


def test_a_stopped_run_is_resumed_or_discarded_on_purpose_never_overwritten(buckets):
    studio, checkpoint = buckets
    project = studio.project("buckets")
    state = project.path / "train" / "state.pt"
    state.parent.mkdir(parents=True)
    state.write_bytes(b"a stopped run")  # what a stop leaves
    message = ("'buckets' has a stopped run: resume it (Resume, --resume) or start over, which discards it "
               "(Start over, --restart)")
    with pytest.raises(LoraMakerError) as refused:
        studio.start_training("buckets")
    assert str(refused.value) == message

    blocks = build_tab(studio)
    with pytest.raises(gr.Error) as in_tab:
        tab_handler(blocks, "start_training")("buckets", False, *_form_values(studio.training_settings("buckets")))
    assert in_tab.value.message == message
    with serve(studio) as port, httpx.Client(base_url=f"http://127.0.0.1:{port}{PREFIX}", timeout=60) as api:
        reply = api.post("/projects/buckets/train", json={})
    assert reply.status_code == 400 and reply.json()["error"] == message
    cli = run("train", "buckets", "--checkpoint", str(checkpoint), root=studio.projects_root())
    assert cli.returncode == 1 and cli.stderr.strip() == f"error: {message}"
    assert state.read_bytes() == b"a stopped run"


def test_an_sdxl_model_gets_the_xl_trainers_defaults_and_the_plan_says_so(tmp_path):
    from lora_trainer_ext.api.training import plan_answer

    studio = standalone_studio(make_checkpoint(tmp_path / "model", "sdxl"), root=tmp_path / "projects")
    project = studio.project("xl", create=True)
    add_image(project, "0.png", "mychar", size=(64, 64))
    settings = studio.training_settings("xl")
    assert (settings.repeats, settings.batch_size, settings.unet_lr, settings.text_encoder_lr, settings.dim) == \
        (2, 4, 3e-4, 6e-5, 8)
    plan = studio.training_plan("xl")
    assert plan.steps.render().startswith("1 images x 2 repeats x 10 epochs / batch 4")
    assert plan.family_defaults.startswith("SDXL-family defaults") and "multires_noise_iterations 6" in plan.family_defaults
    assert plan_answer(plan)["family_defaults"] == plan.family_defaults
    studio.save_training_settings("xl", settings.replace(epochs=4))
    assert project.settings()["train"] == {"epochs": 4}  # the XL defaults are not written down


def test_the_plan_fits_the_run_to_the_card_in_one_click(tmp_path):
    """On a (stated) 12 GB card an SDXL run at batch 4 without checkpointing does not fit: the plan, the API and
    the CLI name the cheapest changes that do, and the Train tab's button applies them to the form."""
    from lora_trainer_ext.api.training import plan_answer
    from lora_trainer_ext.tab.train_form import KEYS, form_values

    studio = standalone_studio(make_checkpoint(tmp_path / "model", "sdxl"), root=tmp_path / "projects")
    studio.gpu_memory = lambda: (11.0, 12.0)
    add_image(studio.project("xl", create=True), "0.png", "mychar", size=(64, 64))
    heavy = studio.training_settings("xl").replace(gradient_checkpointing=False, text_encoder_lr=0.0,
                                                     optimizer="AdamW", resolution=1024)
    plan = studio.training_plan("xl", heavy)
    assert plan.verdict.startswith("too big")
    fitted, changes = plan.memory_fix
    assert plan.memory_notes[0] == "to fit: " + "; ".join(changes) and changes[0].startswith("gradient checkpointing")
    assert studio.training_plan("xl", fitted).verdict.startswith("fits")
    assert plan_answer(plan)["vram"]["fit"]["settings"] == fitted.to_dict()
    fit = tab_handler(build_tab(studio), "fit_memory")
    shown = fit("xl", *form_values(heavy))
    assert shown[KEYS.index("gradient_checkpointing")] == "on" and "Changed to fit" in shown[-1]
    assert shown[:len(KEYS)] == form_values(fitted)
    assert studio.training_plan("xl", fitted).memory_fix is None
