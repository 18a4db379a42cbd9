"""Project names, layout and the default folders."""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path

import pytest

from lora_trainer_ext import migrations, paths
from lora_trainer_ext.errors import LoraMakerError
from lora_trainer_ext.project import Project, list_projects, validate_name


@pytest.mark.parametrize("name", ["mychar", "my_char-v2", "Miku.2024", "a"])
def test_good_names(name):
    assert validate_name(name) == name


@pytest.mark.parametrize("name", ["", "../evil", "a/b", "a\\b", ".hidden", "con", "LPT1", "x" * 65, "a b", "a:b", "end."])
def test_names_that_would_escape_or_break_are_refused(name):
    with pytest.raises(LoraMakerError, match="invalid project name"):
        validate_name(name)


def test_layout_and_listing(tmp_path):
    with pytest.raises(LoraMakerError, match="no project 'new'"):
        Project.open(tmp_path, "new")
    project = Project.open(tmp_path, "new", create=True)
    assert project.dataset_dir == tmp_path / "new" / "dataset" and project.dataset_dir.is_dir()
    (tmp_path / "not-a-project").mkdir()
    assert list_projects(tmp_path) == ["new"]
    project.update_settings(dataset={"keep_tokens": 1})
    project.update_settings(dataset={"activation_tags": ["x"]}, train={"epochs": 10})
    assert project.settings() == {"version": migrations.VERSION, "dataset": {"keep_tokens": 1, "activation_tags": ["x"]},
                                  "train": {"epochs": 10}}


def test_default_folders(monkeypatch, tmp_path):
    monkeypatch.delenv("LORA_MAKER_ROOT", raising=False)
    monkeypatch.delenv("LORA_MAKER_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert paths.webui_root() is None  # a checkout, not <webui>/extensions/<ext>
    assert paths.default_projects_root() == tmp_path / "lora-maker"
    assert paths.default_model_cache() == tmp_path / ".cache" / "lora-maker"
    monkeypatch.setenv("LORA_MAKER_ROOT", "~/datasets")
    monkeypatch.setenv("LORA_MAKER_CACHE", str(tmp_path / "models"))
    assert paths.default_projects_root() == tmp_path / "datasets"
    assert paths.default_model_cache() == tmp_path / "models"


def test_inside_a_webui_the_defaults_follow_its_folder_and_settings(tmp_path, monkeypatch):
    """A copy of the package placed as the WebUI places an extension finds the WebUI and its config.json."""
    import json
    import shutil
    import subprocess
    import sys

    webui = tmp_path / "webui"
    ext = webui / "extensions" / "lora-maker"
    shutil.copytree(Path(paths.__file__).parent, ext / "lora_trainer_ext", ignore=shutil.ignore_patterns("__pycache__"))
    (webui / "webui.py").write_text("", encoding="utf-8")
    probe = "from lora_trainer_ext import paths; print(paths.default_projects_root()); print(paths.default_model_cache())"
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}

    def defaults():
        out = subprocess.run([sys.executable, "-c", probe], cwd=ext, env=env, capture_output=True, text=True, check=True)
        return [Path(line) for line in out.stdout.split()]

    assert defaults() == [webui / "lora-maker", webui / "models" / "lora-maker"]
    (webui / "config.json").write_text(json.dumps({"lora_maker_projects_root": str(tmp_path / "elsewhere")}), encoding="utf-8")
    assert defaults() == [tmp_path / "elsewhere", webui / "models" / "lora-maker"]


def test_atomic_writes_take_the_users_umask(tmp_path):
    """Not mkstemp's 0600: a WebUI or ComfyUI running as another user must read the LoRA files and cards."""
    code = ("import os, sys; os.umask(0o027); from lora_trainer_ext import files; "
            "from lora_trainer_ext.training import lora_file; p = sys.argv[1]; files.write_text(p + '/a.txt', 'x'); "
            "lora_file.write_card(__import__('pathlib').Path(p) / 'b.safetensors', 'tag', 0.8, 'sd1')")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=Path(__file__).parent.parent,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o640
    assert stat.S_IMODE((tmp_path / "b.json").stat().st_mode) == 0o640
