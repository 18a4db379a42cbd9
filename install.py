"""Adds what LoRA Maker needs to the Python it runs in, without moving any package already installed.

The WebUI runs this at every start, in its venv, from its own folder: it prints nothing when all is
there, one line per package it installed, or what failed and the pip command to run by hand; it never
fails the WebUI's start. Headless, `python install.py` does the same for the Python that runs it (and
exits with status 1 when the install failed). The decisions live in lora_trainer_ext/installer.py.
"""

from __future__ import annotations

import sys
from pathlib import Path


def _webui_launch():
    """The WebUI's `launch` module (on PYTHONPATH when the WebUI runs us), or None headless."""
    try:
        import launch
    except (Exception, SystemExit):  # its import parses the WebUI's command line
        return None
    return launch if hasattr(launch, "run_pip") else None


def _run_pip(args: list, description: str) -> None:
    from lora_trainer_ext.installer import run_pip_subprocess, shell_join

    launch = _webui_launch()
    if launch is None:
        run_pip_subprocess(args, description)
    else:  # the WebUI's way: honours --skip-install and its index URL, and logs like other extensions
        launch.run_pip(shell_join(args), description)


def _failed(reason: str) -> int:
    print(f"LoRA Maker: {reason}", flush=True)
    return 0 if _webui_launch() else 1  # inside the WebUI, its start goes on


def main() -> int:
    requirements = Path(__file__).resolve().with_name("requirements.txt")
    by_hand = f'Run: "{sys.executable}" -m pip install -r "{requirements}"'
    pins = Path("requirements_versions.txt").resolve()  # the WebUI's, in the folder it runs us from
    if pins.is_file():
        by_hand += f' -c "{pins}"'
    try:
        from lora_trainer_ext.errors import LoraMakerError
        from lora_trainer_ext.installer import install
    except Exception as e:  # a broken checkout
        return _failed(f"can't load the installer ({type(e).__name__}: {e}). {by_hand}")
    try:
        installed = install(_run_pip)
    except LoraMakerError as e:  # says what failed and the pip command to run
        return _failed(str(e))
    except Exception as e:  # a bug of ours: still say what to do
        return _failed(f"install failed ({type(e).__name__}: {e}). {by_hand}")
    for item in installed:
        print(f"LoRA Maker: installed {item}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
