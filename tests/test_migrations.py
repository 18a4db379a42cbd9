"""settings.json is versioned and migrated on load; a stopped run resumes across releases.

tests/data/v1-project/v1run was written by the release before versioning (commit c59a8de): its
settings.json has no "version" and names the cosine cycles `lr_restarts`, and it holds a run stopped
after 3 of its 8 steps, on the tiny SD1 checkpoint `make_checkpoint` writes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from tiny_hosts import make_checkpoint

from lora_trainer_ext import migrations
from lora_trainer_ext.errors import LoraMakerError
from lora_trainer_ext.headless import standalone_studio
from lora_trainer_ext.project import Project
from lora_trainer_ext.training.state import state_path

V1 = Path(__file__).parent / "data" / "v1-project"
pytestmark = pytest.mark.timeout(240)


@pytest.fixture
def v1(tmp_path):
    shutil.copytree(V1, tmp_path / "projects")
    checkpoint = make_checkpoint(tmp_path / "model", "sd1")
    return standalone_studio(checkpoint, root=tmp_path / "projects", lora_dir=tmp_path / "lora")


def test_a_settings_file_of_the_last_release_loads_migrated(v1):
    project = v1.project("v1run")
    raw = json.loads(project.settings_path.read_text(encoding="utf-8"))
    assert "version" not in raw and raw["train"]["lr_restarts"] == 2  # as that release wrote it
    settings = v1.training_settings("v1run")
    assert settings.lr_cycles == 2 and settings.lr_scheduler == "cosine_with_restarts" and settings.dim == 1
    assert raw["train"]["keep_last_n_epochs"] == 10 and settings.keep_last_n_epochs == 0  # the old default: keep all
    assert project.settings()["dataset"]["activation_tags"] == ["v1char"]

    v1.save_training_settings("v1run", settings.replace(epochs=5))  # written back in this release's form
    saved = json.loads(project.settings_path.read_text(encoding="utf-8"))
    assert saved["version"] == migrations.VERSION and "lr_restarts" not in saved["train"]
    assert saved["train"]["lr_cycles"] == 2 and saved["train"]["epochs"] == 5
    assert saved["dataset"] == raw["dataset"]  # other sections kept as they were


def test_a_renamed_field_migrates_and_the_new_name_wins(tmp_path):
    project = Project.open(tmp_path, "p", create=True)
    project.settings_path.write_text(json.dumps({"train": {"lr_restarts": 4, "lr_cycles": 1}}), encoding="utf-8")
    assert project.settings()["train"] == {"lr_cycles": 1}  # both present: a file edited by hand after the rename
    project.settings_path.write_text(json.dumps({"version": 1, "train": {"lr_restarts": 4}}), encoding="utf-8")
    assert project.settings() == {"version": migrations.VERSION, "train": {"lr_cycles": 4}}


def test_the_old_keep_last_n_epochs_default_becomes_keep_all_and_a_chosen_value_stays(tmp_path):
    project = Project.open(tmp_path, "p", create=True)
    for kept, expected in ((10, 0), (3, 3), (0, 0)):
        project.settings_path.write_text(json.dumps({"version": 2, "train": {"keep_last_n_epochs": kept}}),
                                         encoding="utf-8")
        assert project.settings()["train"].get("keep_last_n_epochs", 0) == expected  # 0, the default, is not written


def test_a_file_that_held_every_setting_keeps_only_the_chosen_ones_so_sdxl_gets_its_defaults(tmp_path):
    from lora_trainer_ext.hosts.host import SDXL
    from lora_trainer_ext.training import settings as train_settings

    project = Project.open(tmp_path, "p", create=True)
    written = {**migrations._V3_DEFAULTS, "epochs": 6, "dim": 32}  # as releases before version 4 wrote them
    project.settings_path.write_text(json.dumps({"version": 3, "train": written}), encoding="utf-8")
    assert project.settings()["train"] == {"epochs": 6, "dim": 32}
    on_sdxl = train_settings.load(project, SDXL)
    assert (on_sdxl.epochs, on_sdxl.dim, on_sdxl.repeats, on_sdxl.batch_size, on_sdxl.unet_lr) == (6, 32, 2, 4, 3e-4)


@pytest.mark.parametrize("version, words", [(migrations.VERSION + 1, "newer LoRA Maker"), ("2", "whole number"),
                                            (0, "whole number"), (True, "whole number")])
def test_a_settings_file_from_a_newer_release_or_a_bad_version_is_refused(tmp_path, version, words):
    project = Project.open(tmp_path, "p", create=True)
    project.settings_path.write_text(json.dumps({"version": version, "train": {}}), encoding="utf-8")
    with pytest.raises(LoraMakerError, match=words):
        project.settings()


def test_a_run_stopped_by_the_last_release_resumes_in_this_one(v1):
    assert v1.can_resume("v1run")
    job = v1.start_training("v1run", resume=True)
    v1.jobs.wait(180)
    assert job.state == "done", job.error
    assert job.result.steps == 8 and job.result.final.is_file() and not state_path(v1.project("v1run")).exists()


def test_a_stopped_run_resumes_when_a_release_adds_a_setting_and_refuses_a_changed_one(v1):
    v1.save_training_settings("v1run", v1.training_settings("v1run"))  # this release's names
    path = state_path(v1.project("v1run"))
    state = torch.load(path, weights_only=False)
    del state["settings"]["noise_offset"]  # as written by a release before that setting existed
    torch.save(state, path)

    refused = v1.start_training("v1run", v1.training_settings("v1run").replace(unet_lr=5e-4), resume=True)
    v1.jobs.wait(180)
    assert refused.state == "failed" and "other settings (unet_lr)" in refused.error
    kept = v1.start_training("v1run", v1.training_settings("v1run").replace(keep_last_n_epochs=3), resume=True)
    v1.jobs.wait(180)
    assert kept.state == "done" and kept.result.steps == 8, kept.error  # how many files to keep changes nothing learned


def test_start_over_discards_the_stopped_run(v1):
    with pytest.raises(LoraMakerError, match="has a stopped run"):
        v1.start_training("v1run")
    job = v1.start_training("v1run", restart=True)
    v1.jobs.wait(180)
    assert job.state == "done" and job.result.steps == 8, job.error  # all 8 steps: nothing was resumed
    assert not state_path(v1.project("v1run")).exists() and v1.can_resume("v1run") is False


def test_an_optimizer_chosen_before_optimizer_args_keeps_the_arguments_it_had(tmp_path):
    """Unset optimizer_args means the notebooks' recommended arguments, which differ from what version 4 gave
    Prodigy (and SDXL's AdamW): a file (or stopped run) that chose an optimizer keeps its old arguments."""
    project = Project.open(tmp_path, "p", create=True)
    for optimizer, args in (("Prodigy", "weight_decay=0.01 safeguard_warmup=True bias_correction=True"),
                            ("AdamW8bit", "weight_decay=0.01")):
        project.settings_path.write_text(json.dumps({"version": 4, "train": {"optimizer": optimizer}}), encoding="utf-8")
        assert project.settings()["train"] == {"optimizer": optimizer, "optimizer_args": args}
    project.settings_path.write_text(json.dumps({"version": 4, "train": {"epochs": 3}}), encoding="utf-8")
    assert project.settings()["train"] == {"epochs": 3}  # AdamW by default: the recommended arguments from now on
