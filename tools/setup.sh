#!/usr/bin/env bash
# Sets up the development environment in .venv/: Python 3.11, a CPU build of torch, our requirements,
# the WebUI 1.10.1 versions of the packages our code touches, the test tools, Debian's Chromium for the
# browser tests, and the offline wheelhouse
# (.cache/wheelhouse) from which tests/test_install.py builds a WebUI-pinned venv without the network.
# Safe to run again: it only adds what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3.11}
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip --disable-pip-version-check -q)

if ! .venv/bin/python -c 'import torch' 2>/dev/null; then
  # The CPU build: the WebUI brings its own CUDA torch and we never pin one.
  "${pip[@]}" install torch==2.13.0 || "${pip[@]}" install torch --index-url https://download.pytorch.org/whl/cpu
fi
"${pip[@]}" install -r requirements-dev.txt
"${pip[@]}" install --no-deps stable-diffusion-sdkit==2.1.5  # the real ldm classes; its own pins are not ours

# Debian's Chromium for the browser tests (Playwright drives it; it never downloads a browser of its own).
if ! command -v chromium >/dev/null; then
  sudo=(); [ "$(id -u)" = 0 ] || sudo=(sudo)
  "${sudo[@]}" apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -q --no-install-recommends chromium >/dev/null
fi

# The wheelhouse: every pin of the WebUI (no dependencies, as the WebUI installs them) plus what our
# requirements resolve to on their own, newest first, so the install test would see any upgrade pip wants.
torch_version=$(.venv/bin/python -c 'import torch; print(torch.__version__)')
mkdir -p .cache/wheelhouse
grep -vE '^\s*(#|$|torch\s*$)' tests/data/webui-1.10.1-pins.txt | sed 's/ *#.*//' > .cache/webui-pins.txt
"${pip[@]}" download --no-deps -d .cache/wheelhouse -r .cache/webui-pins.txt
"${pip[@]}" download -d .cache/wheelhouse -r requirements.txt "torch==$torch_version"
# ... and what they resolve to under the pins (e.g. a scipy that takes numpy 1.26.2), which is what
# install.py installs in a WebUI. setuptools is left free: torch 2.13 needs >=77 (the WebUI's 2.1.2 doesn't).
grep -v '^setuptools' .cache/webui-pins.txt > .cache/webui-pins-but-setuptools.txt
"${pip[@]}" download -d .cache/wheelhouse -r requirements.txt -c .cache/webui-pins-but-setuptools.txt "torch==$torch_version"
echo "Development environment ready: .venv/ (run the tests with: .venv/bin/python -m pytest)"
