"""install.py and lora_trainer_ext/installer.py.

The pure decisions (requirement lines, version ranges, which onnxruntime build, the constraints) are
tested directly. The important test builds a venv holding the WebUI 1.10.1 pins and torch from the
offline wheelhouse that tools/setup.sh fills, runs the real install.py in it the way the WebUI does,
and checks that no pin, nor anything else that was installed, moved."""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from lora_trainer_ext.errors import LoraMakerError
from lora_trainer_ext.installer import (
    ORT_GPU,
    ORT_MIN,
    ORT_RANGE,
    InstallFailed,
    bundled_cudnn_major,
    canonical,
    constraint_lines,
    install,
    missing,
    onnxruntime_requirement,
    parse_requirements,
    read_requirements,
    satisfies,
    shell_join,
    webui_pins,
)

ROOT = Path(__file__).resolve().parent.parent
PINS = ROOT / "tests" / "data" / "webui-1.10.1-pins.txt"
# Built by tools/setup.sh; LORA_MAKER_WHEELHOUSE points the venv test at another one.
WHEELHOUSE = Path(os.environ.get("LORA_MAKER_WHEELHOUSE") or ROOT / ".cache" / "wheelhouse")

PLAIN = f"onnxruntime{ORT_RANGE}"
GPU_CUDA11_CUDNN8 = ORT_GPU[(11, 8)]
GPU_CUDA12_CUDNN9 = ORT_GPU[(12, 9)]


# --- requirement lines and versions ----------------------------------------------------------------


def test_parse_requirements_reads_names_extras_and_ranges():
    text = "# what we need\n\nonnxruntime>=1.17, <1.27   # protobuf\nImageHash >= 4.3\nLycoris_Lora[a, b]>=3.4,<4\n"
    text += "requests\n"
    assert [tuple(r) for r in parse_requirements(text)] == [
        ("onnxruntime", "", ">=1.17,<1.27"),
        ("imagehash", "", ">=4.3"),
        ("lycoris-lora", "[a,b]", ">=3.4,<4"),
        ("requests", "", ""),
    ]
    assert parse_requirements(text)[2].text == "lycoris-lora[a,b]>=3.4,<4"


@pytest.mark.parametrize(
    "line", ["tqdm; python_version < '3.11'", "-r other.txt", "pkg @ file:///tmp/pkg.whl", "numpy=>1"]
)
def test_parse_requirements_rejects_what_it_cannot_read(line):
    with pytest.raises(LoraMakerError, match="line 2"):
        parse_requirements(f"requests\n{line}\n")
    assert parse_requirements(f"requests\n{line}\n", strict=False) == parse_requirements("requests")


def test_our_requirements_file_parses_and_its_onnxruntime_range_is_the_installers():
    requirements = {r.name: r.spec for r in read_requirements()}
    assert {"onnxruntime", "imagehash", "lycoris-lora", "requests", "tqdm"} <= set(requirements)
    assert requirements["onnxruntime"] == ORT_RANGE
    assert ORT_RANGE.startswith(f">={ORT_MIN},")
    # The cuDNN 9 GPU build has the same upper bound: protobuf>=4.25.8 from 1.27 on.
    assert GPU_CUDA12_CUDNN9.endswith(ORT_RANGE.split(",")[1])


SATISFIES = [  # the cases our ranges meet
    ("1.26.0", ">=1.17,<1.27", True),
    ("1.27.0", ">=1.17,<1.27", False),
    ("1.16.3", ">=1.17", False),
    ("1.27.0.dev20250101", "<1.27", False),  # a pre-release of the excluded version
    ("3.9.9", ">=3.4,<4", True),
    ("4.0.0rc1", "<4", False),
    ("2.1.2+cu121", ">=2.4", False),  # local versions (torch's +cu121) compare by their release
    ("2.4.1+cu124", ">=2.4", True),
    ("not a version", ">=1", False),
    ("1.0", "", True),
]


@pytest.mark.parametrize("version, spec, expected", SATISFIES)
def test_satisfies(version, spec, expected):
    assert satisfies(version, spec) == expected


# --- which onnxruntime -----------------------------------------------------------------------------

ORT_CASES = {
    "cpu torch": ({"torch": "2.1.2+cpu"}, "2.1.2+cpu", None, PLAIN),
    "no torch": ({}, "", None, PLAIN),
    "mac torch": ({"torch": "2.1.2"}, "2.1.2", None, PLAIN),
    "rocm torch": ({"torch": "2.1.2+rocm5.6"}, "2.1.2+rocm5.6", None, PLAIN),
    "cu118, cuDNN 8 beside torch (Windows)": ({"torch": "2.1.2+cu118"}, "2.1.2+cu118", 8, GPU_CUDA11_CUDNN8),
    "cu118 torch 2.1, cuDNN unknown": ({"torch": "2.1.2+cu118"}, "2.1.2+cu118", None, GPU_CUDA11_CUDNN8),
    # WebUI 1.10.1's default: no PyPI GPU build is made for CUDA 12 with cuDNN 8.
    "cu121 + nvidia-cudnn-cu12 8.9": (
        {"torch": "2.1.2+cu121", "nvidia-cudnn-cu12": "8.9.2.26"}, "2.1.2+cu121", None, PLAIN),
    "cu121, cuDNN 8 beside torch (Windows)": ({"torch": "2.1.2+cu121"}, "2.1.2+cu121", 8, PLAIN),
    "cu121 torch 2.1, cuDNN unknown": ({"torch": "2.1.2+cu121"}, "2.1.2+cu121", None, PLAIN),
    "cu124 + nvidia-cudnn-cu12 9.1": (
        {"torch": "2.4.1+cu124", "nvidia-cudnn-cu12": "9.1.0.70"}, "2.4.1+cu124", None, GPU_CUDA12_CUDNN9),
    "cu124, cuDNN 9 beside torch (Windows)": ({"torch": "2.4.1+cu124"}, "2.4.1+cu124", 9, GPU_CUDA12_CUDNN9),
    "cu124 torch 2.4, cuDNN unknown": ({"torch": "2.4.1+cu124"}, "2.4.1+cu124", None, GPU_CUDA12_CUDNN9),
    "PyPI torch on Linux (cuDNN 9 package)": (
        {"torch": "2.5.1", "nvidia-cudnn-cu12": "9.1.0.70", "nvidia-cuda-runtime-cu12": "12.4.127"}, "2.5.1", None,
        GPU_CUDA12_CUDNN9),
    "PyPI torch 2.1 on Linux (cuDNN 8 package)": (
        {"torch": "2.1.2", "nvidia-cudnn-cu12": "8.9.2.26"}, "2.1.2", None, PLAIN),
    "cu118 torch 2.4 (cuDNN 9)": ({"torch": "2.4.1+cu118"}, "2.4.1+cu118", 9, PLAIN),
    "cu130 torch": ({"torch": "2.9.0+cu130"}, "2.9.0+cu130", 9, PLAIN),
    "gpu build present": ({"onnxruntime-gpu": "1.18.1", "torch": "2.4.1+cu124"}, "2.4.1+cu124", 9, None),
    "gpu build newer than our range": ({"onnxruntime-gpu": "1.27.1"}, "2.4.1+cu124", 9, None),
    "old gpu build": ({"onnxruntime-gpu": "1.16.3"}, "2.1.2+cu118", 8, None),
    "directml build present": ({"onnxruntime-directml": "1.20.1", "torch": "2.1.2"}, "2.1.2", None, None),
    "nightly build present": ({"ort-nightly-gpu": "1.27.0.dev20260101"}, "2.1.2+cu121", 8, None),
    "plain within range": ({"onnxruntime": "1.26.0"}, "2.1.2+cpu", None, None),
    "plain newer than our range": ({"onnxruntime": "1.27.0"}, "2.1.2+cpu", None, None),
    "plain too old": ({"onnxruntime": "1.16.3"}, "2.4.1+cu124", 9, PLAIN),
    "plain too old beside a gpu build": (
        {"onnxruntime": "1.16.3", "onnxruntime-gpu": "1.18.1"}, "2.1.2+cu118", 8, None),
}  # fmt: skip


@pytest.mark.parametrize("installed, torch_version, cudnn, expected", ORT_CASES.values(), ids=ORT_CASES.keys())
def test_onnxruntime_requirement(installed, torch_version, cudnn, expected):
    assert onnxruntime_requirement(installed, torch_version, cudnn) == expected


@pytest.mark.parametrize(
    "files, expected",
    [
        (["cudnn64_8.dll", "cudnn_ops_infer64_8.dll", "torch_cuda.dll"], 8),
        (["cudnn64_9.dll", "cudnn_adv64_9.dll"], 9),
        (["libcudnn.so.9", "libcudnn_ops.so.9.1.0", "libtorch_cuda.so"], 9),
        (["libcudnn_ops_infer.so.8.9.2"], 8),
        (["libtorch_cpu.so", "libc10.so"], None),
        (None, None),  # no lib folder
    ],
)
def test_bundled_cudnn_major_reads_torch_lib(tmp_path, files, expected):
    if files is not None:
        (tmp_path / "lib").mkdir()
        for name in files:
            (tmp_path / "lib" / name).write_bytes(b"")
    assert bundled_cudnn_major(tmp_path) == expected


# --- what is missing, and the constraints ----------------------------------------------------------

OURS = parse_requirements("onnxruntime>=1.17,<1.27\nimagehash>=4.3\nlycoris-lora>=3.4,<4\nrequests\ntqdm")


def test_missing_lists_absent_and_out_of_range_requirements():
    everything = {"onnxruntime": "1.26.0", "imagehash": "4.3.2", "lycoris-lora": "3.4.0", "requests": "2.31.0",
                  "tqdm": "4.66.1", "torch": "2.1.2+cu121"}  # fmt: skip
    assert missing(OURS, everything) == []
    drifted = {**everything, "lycoris-lora": "4.1.0", "imagehash": "4.2.1", "onnxruntime": "1.27.0"}
    del drifted["tqdm"]
    assert missing(OURS, drifted) == ["imagehash>=4.3", "lycoris-lora>=3.4,<4", "tqdm"]
    everything_missing = [PLAIN, "imagehash>=4.3", "lycoris-lora>=3.4,<4", "requests", "tqdm"]
    assert missing(OURS, {"torch": "2.1.2+cpu"}) == everything_missing
    assert missing(OURS, {"torch": "2.4.1+cu124", "nvidia-cudnn-cu12": "9.1.0.70"})[0] == GPU_CUDA12_CUDNN9


def test_missing_finds_nothing_in_the_development_environment():
    # tools/setup.sh installs requirements.txt into this venv: everything is there.
    assert missing(read_requirements()) == []


def test_constraint_lines_freeze_everything_installed_but_what_we_reinstall():
    installed = {"numpy": "1.26.4", "torch": "2.1.2+cu121", "nvidia-cudnn-cu12": "8.9.2.26", "lycoris-lora": "4.1.0",
                 "protobuf": "3.20.0", "broken": "not a version"}  # fmt: skip
    pins = {"numpy": "==1.26.2", "protobuf": "==3.20.0", "gradio": "==3.41.2", "torch": ""}
    lines = constraint_lines(installed, pins, ["lycoris-lora", "protobuf", "torch", "onnxruntime"])
    assert lines == [
        "gradio==3.41.2",  # a pin that isn't installed: the WebUI's version
        "numpy==1.26.4",  # a pin that is: the installed version
        "nvidia-cudnn-cu12==8.9.2.26",  # not a pin, still frozen
        "protobuf==3.20.0",  # a pin stays frozen even when asked for
        "torch==2.1.2+cu121",
    ]


def test_webui_pins_come_from_the_first_folder_that_has_them(tmp_path, monkeypatch):
    empty, webui = tmp_path / "empty", tmp_path / "webui"
    empty.mkdir()
    webui.mkdir()
    shutil.copy(PINS, webui / "requirements_versions.txt")
    pins = webui_pins([None, empty, webui])
    assert pins["numpy"] == "==1.26.2" and pins["pillow"] == "==9.5.0" and pins["torch"] == ""
    assert "pytorch-lightning" in pins and "open-clip-torch" in pins
    monkeypatch.chdir(webui)  # where the WebUI runs install.py
    assert webui_pins() == pins
    assert webui_pins([empty]) == {}


def test_shell_join_survives_the_shell_launch_run_pip_uses(tmp_path):
    constraints = str(tmp_path / "a dir" / "c.txt")
    args = ["install", "onnxruntime>=1.17,<1.27", "lycoris-lora>=3.4,<4", "-c", constraints, "tqdm"]
    echo = "import json, sys; print(json.dumps(sys.argv[1:]))"
    result = subprocess.run(shell_join([sys.executable, "-c", echo, *args]), shell=True, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == args


def test_install_runs_no_pip_when_all_is_there():
    calls = []
    start = time.perf_counter()
    assert install(lambda *a: calls.append(a)) == []
    print(f"install() with nothing missing: {(time.perf_counter() - start) * 1000:.1f} ms")
    assert calls == []


def test_install_says_so_when_pip_installs_nothing(tmp_path):
    # The WebUI's launch.run_pip returns without running pip under --skip-install.
    with pytest.raises(InstallFailed, match="pip did not install lora-maker-test-absent>=1") as failure:
        install(lambda args, description: None, parse_requirements("lora-maker-test-absent>=1"))
    constraints = Path(re.search(r'-c "?([^"]+)"?$', failure.value.command).group(1))
    try:  # kept, so that the command in the message reproduces the attempt
        assert "-m pip install lora-maker-test-absent>=1" in failure.value.command.replace('"', "")
        assert f"pytest=={importlib.metadata.version('pytest')}" in constraints.read_text().splitlines()
    finally:
        constraints.unlink()


# --- the real install into a WebUI-pinned venv -----------------------------------------------------


def _pip_env(find_links: Path) -> dict:
    """The environment for the test venv: no user/site pip configuration (this machine's adds indexes
    and caps torch), no index, only `find_links`, no PYTHONPATH: what a WebUI user's pip sees offline."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "PYTHON"))}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_NO_INDEX="1", PIP_FIND_LINKS=str(find_links),
               PIP_DISABLE_PIP_VERSION_CHECK="1", PYTHONNOUSERSITE="1")  # fmt: skip
    return env


def _run(args: list, env: dict, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], env=env, cwd=cwd, capture_output=True, text=True, timeout=600)


def _check(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"{result.args}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def _freeze(venv) -> dict:
    listing = _check(_run([venv.python, "-m", "pip", "list", "--format=json"], venv.env)).stdout
    return {canonical(p["name"]): p["version"] for p in json.loads(listing)}


# The WebUI's launch module as far as install.py uses it: run_pip runs `"{python}" -m pip {command}
# --prefer-binary` through a shell and raises RuntimeError with pip's output when pip fails.
LAUNCH_STAND_IN = '''
import subprocess, sys

def run_pip(command, desc=None):
    print(f"Installing {desc}")
    result = subprocess.run(f'"{sys.executable}" -m pip {command} --prefer-binary', shell=True,
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"Couldn't install {desc}.\\nCommand: {command}\\n{result.stdout}\\n{result.stderr}")
    return result.stdout
'''


@pytest.fixture(scope="module")
def webui_venv(tmp_path_factory):
    """A venv like a WebUI 1.10.1 one: the pins (without dependencies, as pinned) and this
    environment's torch with its dependencies; plus a WebUI folder with requirements_versions.txt
    and a stand-in `launch` module."""
    if not any(WHEELHOUSE.glob("torch-*.whl")):
        pytest.skip(f"no wheelhouse with torch at {WHEELHOUSE}: run tools/setup.sh")
    base = tmp_path_factory.mktemp("webui")
    _check(_run([sys.executable, "-m", "venv", base / "venv"], os.environ.copy()))
    bin_dir = base / "venv" / ("Scripts" if os.name == "nt" else "bin")
    venv = SimpleNamespace(python=bin_dir / "python", env=_pip_env(WHEELHOUSE), root=base / "webui-root", base=base)
    pip = [venv.python, "-m", "pip", "install", "-q"]

    # Our torch stands in for the WebUI's 2.1.2. A pin that it can't live with is left to it, as the
    # real WebUI's torch has no such requirement (torch 2.13 needs setuptools>=77, the pin is 69.5.1).
    torch = f"torch=={importlib.metadata.version('torch')}"
    needs = [r.split(";")[0] for r in importlib.metadata.requires("torch") or [] if "extra ==" not in r]
    torch_needs = {r.name: r.spec for r in parse_requirements("\n".join(needs), strict=False)}
    pins, venv.left_to_torch = [], []
    for pin in parse_requirements(PINS.read_text(encoding="utf-8")):
        clash = pin.name in torch_needs and not satisfies(pin.spec.lstrip("="), torch_needs[pin.name])
        (venv.left_to_torch if clash else pins).append(pin)
    venv.pins = [p for p in pins if p.name != "torch"]

    # jsonmerge is an sdist and the wheelhouse has no `wheel`: build it without isolation, with a
    # setuptools that builds wheels by itself (>=70.1); the setuptools pin, if kept, then replaces it.
    _check(_run([*pip, "--no-deps", "setuptools>=70.1"], venv.env))
    _check(_run([*pip, "--no-deps", "--no-build-isolation", *[p.text for p in venv.pins], torch], venv.env))
    # torch's own dependencies (the WebUI's venv has them), all else held where it is.
    frozen = _freeze(venv)
    (base / "frozen.txt").write_text("".join(f"{n}=={v}\n" for n, v in frozen.items()), encoding="utf-8")
    _check(_run([*pip, "-c", base / "frozen.txt", *[n for n in torch_needs if n not in frozen]], venv.env))

    venv.root.mkdir()
    (venv.root / "requirements_versions.txt").write_text("".join(f"{p.text}\n" for p in pins), encoding="utf-8")
    (venv.root / "launch.py").write_text(LAUNCH_STAND_IN, encoding="utf-8")
    return venv


def _install_py(venv, in_webui: bool, **env: str) -> subprocess.CompletedProcess:
    """install.py as the WebUI runs it (from the WebUI folder, with the WebUI folder on PYTHONPATH so
    that `import launch` works), or headless (no launch module)."""
    env = {**venv.env, **env, **({"PYTHONPATH": str(venv.root)} if in_webui else {})}
    return _run([venv.python, ROOT / "install.py"], env, cwd=venv.root)


@pytest.mark.timeout(900)
def test_install_py_never_moves_a_webui_pin(webui_venv):
    venv = webui_venv
    before = _freeze(venv)
    assert all(satisfies(before[p.name], p.spec) for p in venv.pins), "the venv doesn't hold the WebUI pins"

    # pip failing (here: nothing to install from) is reported with the command, changes nothing, and
    # never fails the WebUI's start.
    nothing = venv.base / "empty-wheelhouse"
    nothing.mkdir(exist_ok=True)
    for in_webui, status in ((True, 0), (False, 1)):
        failed = _install_py(venv, in_webui, PIP_FIND_LINKS=str(nothing))
        assert failed.returncode == status, failed.stdout + failed.stderr
        assert "LoRA Maker: could not install" in failed.stdout and " -m pip install " in failed.stdout
        Path(re.search(r'-c "?([^"\n]+?)"?$', failed.stdout, re.M).group(1)).unlink()  # kept for the user
    assert _freeze(venv) == before

    start = time.perf_counter()
    first = _check(_install_py(venv, in_webui=True))
    first_time = time.perf_counter() - start
    assert "LoRA Maker: installed " in first.stdout and "could not" not in first.stdout, first.stdout
    after = _freeze(venv)
    moved = {name: (version, after.get(name)) for name, version in before.items() if after.get(name) != version}
    assert moved == {}, f"install.py changed installed packages: {moved}"
    assert after["torch"] == before["torch"]
    ours = {r.name for r in read_requirements()} - set(before)
    reported = {canonical(line.rpartition(" ")[2].split("==")[0])
                for line in first.stdout.splitlines() if line.startswith("LoRA Maker: installed ")}  # fmt: skip
    assert reported == ours and ours <= set(after)
    # (not pytorch_optimizer: it imports transformers, which this venv holds without transformers' own
    # dependencies; the real WebUI's Python trains with it in tests/webui_session.py)
    _check(_run([venv.python, "-c", "import onnxruntime, imagehash, lycoris"], venv.env))

    start = time.perf_counter()
    second = _check(_install_py(venv, in_webui=True))
    second_time = time.perf_counter() - start
    assert second.stdout.strip() == "" and _freeze(venv) == after
    print(f"\npins left to the stand-in torch: {[p.text for p in venv.left_to_torch]}")
    print(f"install.py: first run {first_time:.1f} s, installed {sorted(set(after) - set(before))};"
          f" second run {second_time:.2f} s, installed nothing")  # fmt: skip


@pytest.mark.timeout(900)
def test_constraints_stop_pip_moving_a_pin_it_could_move(webui_venv):
    venv = webui_venv
    # The wheelhouse holds numpy 2: unconstrained, pip would replace the WebUI's numpy 1.26.2.
    would = _check(_run([venv.python, "-m", "pip", "install", "--dry-run", "numpy>=2"], venv.env))
    assert re.search(r"Would install .*numpy-2", would.stdout)
    before = _freeze(venv)
    code = (
        "import sys\n"
        "from lora_trainer_ext.installer import InstallFailed, install, parse_requirements, run_pip_subprocess\n"
        "try:\n    install(run_pip_subprocess, parse_requirements('numpy>=2'))\n"
        "except InstallFailed as e:\n    print(e.command)\n    print(e)\n    sys.exit(3)\n"
    )
    result = _run([venv.python, "-c", code], {**venv.env, "PYTHONPATH": str(ROOT)}, cwd=venv.root)
    assert result.returncode == 3, result.stdout + result.stderr
    command, message = result.stdout.splitlines()[:2]
    assert message.startswith("could not install numpy>=2") and "(constraint) numpy==1.26.2" in message
    constraints = Path(re.search(r'-c "?([^"]+)"?$', command).group(1))
    assert "numpy==1.26.2" in constraints.read_text(encoding="utf-8").splitlines()
    constraints.unlink()
    assert _freeze(venv) == before
