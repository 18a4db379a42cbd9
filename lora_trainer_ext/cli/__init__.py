"""The headless command line: `python -m lora_trainer_ext [--root DIR] COMMAND PROJECT [options]`.

parser.py holds the arguments, commands.py one function per command over a Studio (headless.py's,
training on --checkpoint), watch.py follows a job in the terminal. Exit status 0 on success; on failure
a one-line reason on stderr and a non-zero status (1 error, 130 stopped by Ctrl-C)."""

from __future__ import annotations

import sys

from ..errors import LoraMakerError
from ..jobs import STOPPED
from ..paths import default_projects_root
from . import commands
from .parser import build_parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    studio = _studio(args)
    try:
        getattr(commands, f"cmd_{args.command}")(args, studio)
    except LoraMakerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # a full disk, a folder without write permission: say which file
        print(f"error: {e.strerror or e}{f': {e.filename}' if e.filename else ''}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted (what was done is kept)", file=sys.stderr)
        return 130
    job = studio.jobs.current()
    return 130 if job is not None and job.state == STOPPED else 0


def _studio(args):
    """The Studio the command runs on: headless, over --checkpoint when the command has one."""
    from ..headless import standalone_studio
    from .watch import Watch

    serving = args.command == "ui"  # the page shows the jobs; `train --lora-dir` is the project's own folder,
    lora_dir = getattr(args, "lora_dir", None)  # `ui --lora-dir` holds a folder per project
    if lora_dir and not serving:
        lora_dir = (lambda folder: lambda name: folder)(lora_dir)
    return standalone_studio(getattr(args, "checkpoint", None), root=args.root or default_projects_root(),
                             lora_dir=lora_dir, model_cache=getattr(args, "model_cache", None),
                             device=getattr(args, "device", None), config=getattr(args, "model_config", None),
                             observe=None if serving else Watch())
