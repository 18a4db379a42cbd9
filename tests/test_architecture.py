"""The package's shape holds: who may import what, and how big a file or a function may grow."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "lora_trainer_ext"
MAX_FILE_LINES = 420  # "about 400": split by what the code does before it grows past this
MAX_FUNCTION_LINES = 85  # "about 80", a gradio tab builder included


def sources() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_only_the_webui_adapter_and_the_scripts_import_the_webuis_modules():
    allowed = PACKAGE / "webui"
    found = [f"{path.relative_to(REPO)}: {name}" for path in [*sources(), REPO / "install.py"]
             if allowed not in path.parents
             for name in imported_modules(path) if name == "modules" or name.startswith("modules.")]
    assert found == []
    assert any(name.startswith("modules") for path in allowed.rglob("*.py") for name in imported_modules(path))


@pytest.mark.parametrize("modules", [
    "lora_trainer_ext.dataset, lora_trainer_ext.jobs, lora_trainer_ext.studio, lora_trainer_ext.headless",
    "lora_trainer_ext.dataset.scrape, lora_trainer_ext.dataset.tagger, lora_trainer_ext.dataset.captioner",
    "lora_trainer_ext.training.settings, lora_trainer_ext.training.plan, lora_trainer_ext.training.presets",
])
def test_dataset_jobs_and_the_service_start_without_torch_or_the_training_engine(modules):
    code = (f"import sys; import {modules}\n"
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'lycoris', 'gradio', 'modules')"
            " or m.startswith(('lora_trainer_ext.training.trainer', 'lora_trainer_ext.training.network')))\n"
            "print(heavy)")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_the_runtime_never_imports_the_developer_code():
    dev = PACKAGE / "dev"
    for path in sources():
        if dev in path.parents or path.parent == PACKAGE / "cli":  # the CLI's bench command is developer-facing
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                assert "dev" not in (node.module or "").split("."), f"{path.relative_to(REPO)} imports dev/"


def test_no_file_or_function_outgrows_its_reader():
    big_files, big_functions = [], []
    for path in sources():
        text = path.read_text(encoding="utf-8")
        if text.count("\n") > MAX_FILE_LINES:
            big_files.append(f"{path.relative_to(REPO)}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    big_functions.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name}: {length} lines")
    assert big_files == [] and big_functions == []
