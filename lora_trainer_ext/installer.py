"""What install.py adds to the WebUI's Python, decided cheaply and installed without moving anything.

The WebUI runs our install.py at every start, in its own venv. This module decides which lines of
requirements.txt are not satisfied (importlib.metadata only: no torch import, no subprocess, a few
milliseconds when everything is there), picks the onnxruntime build that matches the installed torch,
and installs the rest through an injected pip runner under a constraints file that freezes every
package already installed: pip may add packages, never change one. So an install either leaves the
WebUI's environment as it was plus our packages, or fails with a clear message.

Decisions:
- Everything installed is frozen, not only the WebUI's pins and torch: torch's CUDA libraries
  (nvidia-cudnn-cu12 ...) and other extensions' packages must not move either. pip also checks
  the dependencies of installed packages it passes through (torch's, for lycoris-lora): where those
  are already broken, the install fails naming pip's conflict rather than "repairing" it.
- One pip run for everything missing: all or nothing, in one resolution.
- A package of ours installed outside our range (lycoris-lora 4.x, which needs torch>=2.4) is the one
  thing left free: it is reinstalled within the range. A WebUI pin or torch is never freed; if ours
  can't be installed without moving one, pip fails and we say so.
- onnxruntime: any installed build (onnxruntime-gpu, -directml, ...) is kept as it is: those builds
  match a hardware stack we can't judge, and they conflict with each other (one `onnxruntime`
  module). Plain onnxruntime older than our minimum is upgraded; newer than our upper bound is kept:
  the bound only stops pip pulling protobuf>=4.25.8 when *we* install, an installed runtime runs our models.
- WebUI pins that are not installed are constrained to the version in the WebUI's
  requirements_versions.txt. We bundle no copy of that list: outside a WebUI there are no WebUI
  versions to impose, and whatever is installed is frozen anyway.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterable, NamedTuple

from .errors import LoraMakerError

REQUIREMENTS = Path(__file__).resolve().parent.parent / "requirements.txt"
WEBUI_PINS_FILE = "requirements_versions.txt"

# Never freed for reinstalling, even when one of our requirements names them.
TORCH_FAMILY = ("torch", "torchvision", "torchaudio", "xformers")

# Must match the onnxruntime line of requirements.txt (a test checks).
ORT_MIN = "1.17"
ORT_RANGE = ">=1.17,<1.27"
# onnxruntime-gpu on PyPI: 1.17-1.18 are CUDA 11.8 + cuDNN 8 builds, 1.19+ CUDA 12 + cuDNN 9. Other
# combinations (WebUI 1.10.1's torch 2.1.2+cu121 has CUDA 12 + cuDNN 8) have no PyPI GPU build that
# would load, so they get plain onnxruntime (CPU, plus CoreML on macs).
ORT_GPU = {(11, 8): "onnxruntime-gpu>=1.17,<1.19", (12, 9): "onnxruntime-gpu>=1.19,<1.27"}
# Distributions that install the `onnxruntime` module: any one installed satisfies our requirement.
ORT_BUILDS = (
    "onnxruntime", "onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-openvino",
    "onnxruntime-silicon", "onnxruntime-rocm", "onnxruntime-migraphx", "onnxruntime-qnn",
    "onnxruntime-training", "ort-nightly", "ort-nightly-gpu", "ort-nightly-directml",
)  # fmt: skip
# Where a torch from PyPI (Linux) gets CUDA and cuDNN from.
CUDA_PACKAGES = tuple(f"nvidia-{lib}-cu{major}" for lib in ("cudnn", "cuda-runtime") for major in (11, 12, 13))

PipRunner = Callable[[list, str], object]  # (pip arguments, description); raises when pip fails


class InstallFailed(LoraMakerError):
    """pip could not install our requirements without moving an installed package (or failed)."""

    def __init__(self, message: str, command: str):
        super().__init__(message)
        self.command = command


class Requirement(NamedTuple):
    name: str  # canonical: lower case, runs of -_. as one -
    extras: str  # "[a,b]" or ""
    spec: str  # ">=1.17,<1.27" or ""

    @property
    def text(self) -> str:
        return f"{self.name}{self.extras}{self.spec}"


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


_OP = r"(?:===|[<>=!~]=|[<>])"
_CLAUSE = rf"{_OP}\s*[\w.*+!-]+"
_REQUIREMENT = re.compile(
    rf"([A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?)\s*(\[[\w\s,.-]*\])?\s*((?:{_CLAUSE})(?:\s*,\s*{_CLAUSE})*)?"
)


def parse_requirements(text: str, strict: bool = True) -> list[Requirement]:
    """Requirement lines (`name[extras]<spec>`; comments, blank lines and inline ` # ...` ignored).

    strict: a line we can't read (markers, options, URLs) raises LoraMakerError; else it is skipped."""
    requirements = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = re.sub(r"(^|\s)#.*", "", raw).strip()
        if not line:
            continue
        match = _REQUIREMENT.fullmatch(line)
        if match is None:
            if strict:
                raise LoraMakerError(
                    f"Can't read requirement line {number}: {raw.strip()!r} (only name[extras]<versions>)"
                )
            continue
        name, extras, spec = match.groups()
        requirements.append(Requirement(canonical(name), *(re.sub(r"\s", "", part or "") for part in (extras, spec))))
    return requirements


def read_requirements(path: Path = REQUIREMENTS) -> list[Requirement]:
    try:
        return parse_requirements(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise LoraMakerError(f"Can't read {path}: {e.strerror or e}; reinstall the extension") from e


# --- versions -------------------------------------------------------------------------------------


def _packaging():
    """The `packaging` library: the WebUI's venv has it (transformers needs it), pip always vendors it."""
    try:
        from packaging import specifiers, version
    except ImportError:
        from pip._vendor.packaging import specifiers, version
    return specifiers, version


def is_version(text: str) -> bool:
    """Whether pip can read `text` as a (PEP 440) version."""
    _, version = _packaging()
    try:
        version.Version(text)
    except version.InvalidVersion:
        return False
    return True


def satisfies(version: str, spec: str) -> bool:
    """Whether installed `version` is inside `spec` (">=1.17,<1.27"); pre-releases count."""
    if not spec:
        return True
    specifiers, versions = _packaging()
    try:
        return specifiers.SpecifierSet(spec).contains(version, prereleases=True)
    except (specifiers.InvalidSpecifier, versions.InvalidVersion):
        return False


# --- what is installed ----------------------------------------------------------------------------


def installed_versions(names: Iterable[str]) -> dict[str, str]:
    """{canonical name: version} of those of `names` that are installed (one metadata lookup each)."""
    import importlib.metadata as metadata

    found = {}
    for name in names:
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
        if version:
            found[canonical(name)] = version
    return found


def all_installed() -> dict[str, str]:
    """{canonical name: version} of every installed distribution (the first on sys.path wins, as in imports)."""
    import importlib.metadata as metadata

    found: dict[str, str] = {}
    for dist in metadata.distributions():
        name, version = dist.metadata["Name"], dist.version
        if name and version:
            found.setdefault(canonical(name), version)
    return found


def bundled_cudnn_major(torch_dir: Path | None = None) -> int | None:
    """The cuDNN major version shipped inside torch/lib (Windows wheels, some Linux builds), found
    without importing torch (which costs seconds); None when torch brings none there."""
    if torch_dir is None:
        import importlib.util

        try:
            spec = importlib.util.find_spec("torch")
        except (ImportError, ValueError):
            return None
        if spec is None or not spec.submodule_search_locations:
            return None
        torch_dir = Path(list(spec.submodule_search_locations)[0])
    try:
        names = os.listdir(Path(torch_dir) / "lib")
    except OSError:
        return None
    # cudnn64_8.dll, cudnn_ops64_9.dll, libcudnn.so.8, libcudnn_ops_infer.so.8.9.2
    majors = [int(m.group(1)) for m in map(re.compile(r"(?:lib)?cudnn[a-z_]*(?:64_|\.so\.)(\d+)").match, names) if m]
    return max(majors) if majors else None


def _cuda_major(installed: dict[str, str], torch_version: str) -> int | None:
    local = torch_version.partition("+")[2].lower()
    match = re.fullmatch(r"cu(\d+)", local)
    if match:
        return int(match.group(1)[:-1])  # cu118 -> 11, cu121 -> 12
    if local:
        return None  # cpu, rocm5.6, xpu ...
    for name in installed:  # torch from PyPI on Linux: CUDA comes as nvidia-*-cu12 packages
        match = re.fullmatch(r"nvidia-(?:cudnn|cuda-runtime)-cu(\d+)", name)
        if match:
            return int(match.group(1))
    return None


def onnxruntime_requirement(installed: dict[str, str], torch_version: str, cudnn_major: int | None) -> str | None:
    """The onnxruntime requirement to install, or None when an onnxruntime build is there already.

    installed: {canonical name: version}; torch_version: torch's version ("2.1.2+cu121", "" without
    torch); cudnn_major: the cuDNN major found beside torch (`bundled_cudnn_major`), else taken from an
    installed nvidia-cudnn-cuXX, else guessed from torch (2.4 moved to cuDNN 9)."""
    builds = [name for name in ORT_BUILDS if name in installed]
    if builds:
        outdated = builds == ["onnxruntime"] and not satisfies(installed["onnxruntime"], f">={ORT_MIN}")
        return f"onnxruntime{ORT_RANGE}" if outdated else None
    cuda = _cuda_major(installed, torch_version)
    if cuda is None:
        return f"onnxruntime{ORT_RANGE}"
    cudnn = cudnn_major
    if cudnn is None and f"nvidia-cudnn-cu{cuda}" in installed:
        cudnn = int(re.match(r"\d+", installed[f"nvidia-cudnn-cu{cuda}"]).group())
    if cudnn is None:
        cudnn = 9 if satisfies(torch_version, ">=2.4") else 8
    return ORT_GPU.get((cuda, cudnn), f"onnxruntime{ORT_RANGE}")


def missing(requirements: list[Requirement], installed: dict[str, str] | None = None) -> list[str]:
    """The requirements (as pip specs) not satisfied: absent, or installed outside their range;
    the onnxruntime line becomes `onnxruntime_requirement`'s choice. installed: {canonical name:
    version}, looked up when not given."""
    if installed is None:
        installed = installed_versions([r.name for r in requirements] + [*ORT_BUILDS, *CUDA_PACKAGES, "torch"])
    wanted = []
    for requirement in requirements:
        if requirement.name == "onnxruntime":
            has_build = any(name in installed for name in ORT_BUILDS)
            cudnn = None if has_build else bundled_cudnn_major()  # a directory listing: only when needed
            choice = onnxruntime_requirement(installed, installed.get("torch", ""), cudnn)
            if choice:
                wanted.append(choice)
        elif requirement.name not in installed or not satisfies(installed[requirement.name], requirement.spec):
            wanted.append(requirement.text)
    return wanted


# --- installing -----------------------------------------------------------------------------------


def webui_pins(folders: Iterable[Path | None] | None = None) -> dict[str, str]:
    """{canonical name: spec} from the WebUI's requirements_versions.txt, found in the first of
    `folders` that has one (default: the current folder, where the WebUI runs install.py, then the
    WebUI folder this extension sits in); {} outside a WebUI."""
    if folders is None:
        from .paths import webui_root

        folders = [Path.cwd(), webui_root()]
    for folder in folders:
        if folder is None:
            continue
        try:
            text = (Path(folder) / WEBUI_PINS_FILE).read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        return {r.name: r.spec for r in parse_requirements(text, strict=False)}
    return {}


def constraint_lines(installed: dict[str, str], pins: dict[str, str], installing: Iterable[str]) -> list[str]:
    """pip constraints that freeze every installed package at its version, except the packages of
    ours being (re)installed, and hold not-installed WebUI pins at the WebUI's version. A WebUI pin or
    torch stays frozen even when `installing` names it."""
    free = {canonical(name) for name in installing} - set(pins) - set(TORCH_FAMILY)
    lines = {}
    for name, version in installed.items():
        # A version pip can't parse would make it reject the whole file: leave that package out.
        if name not in free and is_version(version.strip()) and re.fullmatch(r"[a-z0-9][a-z0-9.-]*", name):
            lines[name] = f"{name}=={version.strip()}"
    for name, spec in pins.items():
        if name not in installed and spec:
            lines[name] = f"{name}{spec}"
    return sorted(lines.values())


def shell_join(args: Iterable[str]) -> str:
    """A command line for the WebUI's `launch.run_pip`, which runs it through a shell (sh or cmd.exe):
    double quotes, the quoting both understand, around anything beyond plain path characters."""
    return " ".join(arg if re.fullmatch(r"[\w./@+-]+", arg) else f'"{arg}"' for arg in map(str, args))


def run_pip_subprocess(args: list, description: str) -> None:
    """The pip runner outside the WebUI: this Python's pip, output captured; raises when pip fails."""
    result = subprocess.run(
        [sys.executable, "-m", "pip", *map(str, args), "--prefer-binary"],
        capture_output=True, text=True, encoding="utf-8", errors="replace",
    )  # fmt: skip
    if result.returncode != 0:
        raise RuntimeError(f"pip exited with status {result.returncode}\n{result.stdout}\n{result.stderr}")


def _pip_reason(error: BaseException) -> str:
    """pip's own verdict from a failed run's output: the lines under "The conflict is caused by:",
    else its ERROR lines (the last two), else the last line."""
    text = str(error)
    conflict = re.search(r"The conflict is caused by:\n((?:[ \t]+\S.*\n?)+)", text)
    if conflict:
        lines = [line.strip() for line in conflict.group(1).splitlines()]
    else:
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        lines = [line for line in lines if line.startswith("ERROR:")] or lines or [type(error).__name__]
        lines = lines[-2:]
    reason = "; ".join(lines)
    return reason if len(reason) <= 500 else reason[:500] + "..."


def install(run_pip: PipRunner, requirements: list[Requirement] | None = None) -> list[str]:
    """Install what `missing` reports, in one pip run under `constraint_lines`, and return what was
    installed as "name==version"; [] at once (no subprocess) when nothing is missing.

    Raises InstallFailed with pip's reason and the exact command to run by hand; the constraints file
    is then kept, so that command reproduces the failure."""
    if requirements is None:
        requirements = read_requirements()
    wanted = missing(requirements)
    if not wanted:
        return []
    names = [r.name for r in parse_requirements("\n".join(wanted))]
    lines = constraint_lines(all_installed(), webui_pins(), names)
    fd, path = tempfile.mkstemp(prefix="lora-maker-constraints-", suffix=".txt")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write("# Packages LoRA Maker's install must not move (installed versions, WebUI pins).\n")
        f.write("\n".join(lines) + "\n")
    args = ["install", *wanted, "-c", path]
    command = shell_join([sys.executable, "-m", "pip", *args])
    try:
        run_pip(args, f"LoRA Maker requirements: {', '.join(wanted)}")
    except Exception as e:
        raise InstallFailed(
            f"could not install {', '.join(wanted)} without changing a package that is already installed "
            f"({_pip_reason(e)}). To see pip's full answer, run: {command}",
            command,
        ) from e
    import importlib

    importlib.invalidate_caches()  # importlib.metadata must see what pip just added
    still = missing(requirements)
    if still:  # e.g. the WebUI's --skip-install makes launch.run_pip do nothing
        raise InstallFailed(f"pip did not install {', '.join(still)}. To install it, run: {command}", command)
    Path(path).unlink(missing_ok=True)
    versions = installed_versions(names)
    return [f"{name}=={versions.get(name, '?')}" for name in names]
