"""What a run steps with: the optimizers the notebooks offer (torch's AdamW, bitsandbytes' AdamW8bit, and
pytorch-optimizer's Prodigy, DAdaptAdam, Lion, Adafactor and CAME), their arguments (the notebooks'
recommended ones unless the user writes their own), and the mixed precision (autocast and, for fp16,
loss scaling) on the host's device.

Importing this module loads no torch: the settings form and the plan read the table below.
"""

from __future__ import annotations

import ast
import difflib
import importlib
import inspect
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

from ..errors import LoraMakerError
from ..hosts.host import SDXL

if TYPE_CHECKING:
    import torch

    from ..hosts.host import Host


@dataclass(frozen=True)
class Optimizer:
    name: str
    module: str  # where the class lives ...
    cls: str  # ... and its name
    package: str | None  # the pip package that brings it; None: torch's own
    state_bytes: float  # optimizer state per trained weight, full-size states (tests measure them) ...
    states: str  # what that state is, in words
    recommended: str  # the notebooks' recommended arguments ...
    recommended_sdxl: str | None = None  # ... where the XL trainer's differ
    adaptive: bool = False  # finds its own step size: learning rates about 1
    factored: int = 0  # ... plus fp32 statistics kept per row and per column (Adafactor, CAME)

    def bytes_per_weight(self, dim: int) -> float:
        """State bytes per trained weight at LoRA rank `dim`: a factored statistic of a dim x n matrix holds
        dim + n numbers, about 1/dim of the matrix."""
        return self.state_bytes + self.factored * 4 / max(1, dim)


OPTIMIZER_TABLE = {o.name: o for o in (
    # SD1.5 trainer: the library's weight decay 0.01; the XL trainer's AdamW8bit: 0.1 with betas 0.9/0.99.
    Optimizer("AdamW", "torch.optim", "AdamW", None, 8, "2 fp32 states", "weight_decay=0.01",
              "weight_decay=0.1 betas=0.9,0.99"),
    Optimizer("AdamW8bit", "bitsandbytes.optim", "AdamW8bit", "bitsandbytes", 2, "2 8-bit states",
              "weight_decay=0.01", "weight_decay=0.1 betas=0.9,0.99"),
    Optimizer("Prodigy", "pytorch_optimizer", "Prodigy", "pytorch-optimizer", 16, "4 fp32 states",
              "weight_decouple=True weight_decay=0.01 betas=0.9,0.999 d_coef=2 bias_correction=True "
              "safeguard_warmup=True", adaptive=True),
    Optimizer("DAdaptAdam", "pytorch_optimizer", "DAdaptAdam", "pytorch-optimizer", 12, "3 fp32 states",
              "weight_decouple=True weight_decay=0.01 betas=0.9,0.999", adaptive=True),
    # Lion moves by the sign of its momentum: a third of AdamW's rate (the presets divide it), more decay.
    Optimizer("Lion", "pytorch_optimizer", "Lion", "pytorch-optimizer", 4, "1 fp32 state",
              "weight_decay=0.1 betas=0.9,0.99"),
    # Adafactor keeps row and column statistics instead of a full second moment, and a bf16 momentum.
    Optimizer("Adafactor", "pytorch_optimizer", "AdaFactor", "pytorch-optimizer", 2,
              "a bf16 momentum, factored second moments", "scale_parameter=False relative_step=False warmup_init=False",
              factored=1),
    Optimizer("CAME", "pytorch_optimizer", "CAME", "pytorch-optimizer", 4, "1 fp32 state, 2 factored statistics",
              "weight_decay=0.04", factored=2),
)}
OPTIMIZERS = tuple(OPTIMIZER_TABLE)
# kohya's and the original packages' argument names (prodigyopt, dadaptation), as users paste them from the
# notebooks, by pytorch-optimizer's names.
ARGUMENT_ALIASES = {"decouple": "weight_decouple", "use_bias_correction": "bias_correction"}
ADAPTIVE_LR = {SDXL: 0.75, None: 0.5}  # the notebooks' override for Prodigy and D-Adaptation (XL, SD1.5)
LION_LR_FACTOR = 1 / 3


def recommended_args(name: str, kind: str | None) -> str:
    """The notebooks' recommended arguments of optimizer `name` for a model of `kind` ("" if unknown)."""
    spec = OPTIMIZER_TABLE.get(name)
    if spec is None:
        return ""
    return (spec.recommended_sdxl if kind == SDXL else None) or spec.recommended


@lru_cache(maxsize=None)
def optimizer_available(name: str) -> bool:
    """Whether optimizer `name` can be built here (its package imports)."""
    spec = OPTIMIZER_TABLE.get(name)
    if spec is None:
        return False
    if spec.package is None:
        return True
    try:
        importlib.import_module(spec.module)
    except Exception:  # a package that is installed but broken (no CUDA build, ...) is as good as absent
        return False
    return True


def parse_args(text: str | None) -> dict:
    """"weight_decay=0.1 betas=0.9,0.99" -> {"weight_decay": 0.1, "betas": (0.9, 0.99)}: pairs split by spaces
    or commas (a value may be a list: betas=0.9,0.99 or [0.9, 0.99]); Python literals, true/false in any case,
    lists as tuples; the notebooks' argument names as pytorch-optimizer's."""
    args = {}
    for pair in re.split(r"[\s,]+(?=\w+\s*=)", (text or "").strip(" ,\n\t")):
        if not pair:
            continue
        key, equals, value = pair.partition("=")
        key, value = key.strip(), value.strip(" ,\n\t")
        if not equals or not key.isidentifier():
            raise LoraMakerError(f"can't read the optimizer arguments at {pair!r}: write key=value pairs separated "
                                 "by spaces, e.g. weight_decay=0.1 betas=0.9,0.99")
        if not value:
            raise LoraMakerError(f"optimizer argument {key} has no value: write {key}=VALUE")
        args[ARGUMENT_ALIASES.get(key, key)] = _literal(key, value)
    return args


def _literal(key: str, text: str):
    words = {"true": True, "false": False, "none": None}
    if text.lower() in words:
        return words[text.lower()]
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        raise LoraMakerError(f"optimizer argument {key}={text} is not a number, true/false or a list of "
                             "numbers") from None
    return tuple(value) if isinstance(value, list) else value


def optimizer_class(name: str):
    spec = OPTIMIZER_TABLE.get(name)
    if spec is None:
        raise LoraMakerError(f"unknown optimizer {name!r}: one of {', '.join(OPTIMIZERS)}")
    try:
        return getattr(importlib.import_module(spec.module), spec.cls)
    except Exception as e:
        raise LoraMakerError(f"optimizer {name} needs the {spec.package} package ({type(e).__name__}: {e}): "
                             f"pip install {spec.package} into the WebUI's Python, or choose AdamW") from None


def check_args(name: str, args: dict) -> None:
    """Refuse arguments the optimizer's class does not take, naming the close ones (before any work)."""
    parameters = inspect.signature(optimizer_class(name)).parameters
    known = [p for p in parameters if p not in ("self", "params", "kwargs", "lr")]
    for key in args:
        if key == "lr":
            raise LoraMakerError("set the learning rate with unet_lr and text_encoder_lr, not in optimizer_args")
        if key not in known:
            close = difflib.get_close_matches(key, known, n=2, cutoff=0.6)
            hint = f"did you mean {' or '.join(close)}?" if close else f"it takes {', '.join(known)}"
            raise LoraMakerError(f"optimizer {name} has no argument {key!r}: {hint}")


def make_optimizer(name: str, groups: list[dict], args: dict | None = None) -> torch.optim.Optimizer:
    """Optimizer `name` over `groups` (each with its own lr) with `args` (parsed optimizer_args, which the
    trainer has passed through `check_args` before any work)."""
    import torch

    args = dict(args or {})
    if name == "AdamW":
        # One fused kernel instead of a loop over hundreds of small tensors: on CUDA, and on the CPU
        # from torch 2.4 (the WebUI's torch 2.1 refuses it there).
        on_cuda = all(p.is_cuda for group in groups for p in group["params"])
        args.setdefault("fused", on_cuda or tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 4))
    return optimizer_class(name)(groups, **args)


def describe(name: str, args: dict) -> str:
    """kohya's ss_optimizer text: the class's full name and its arguments, "torch.optim.adamw.AdamW(weight_decay=0.1)"."""
    cls = optimizer_class(name)
    listed = ",".join(f"{key}={value}" for key, value in args.items())
    return f"{cls.__module__}.{cls.__name__}" + (f"({listed})" if listed else "")


def precision_used(host: Host, precision: str) -> str:
    """What a run of `precision` computes in on the host: autocast exists on CUDA only ("no" elsewhere)."""
    return precision if host.device.type == "cuda" else "no"


def autocast_for(host: Host, precision: str):
    """Autocast on CUDA (fp16 with loss scaling, or bf16); plain fp32 maths on the CPU."""
    import torch

    if precision_used(host, precision) == "no":
        return torch.autocast(host.device.type, enabled=False), None
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    scaler = None
    if dtype == torch.float16:  # torch.amp.GradScaler from torch 2.3; the WebUI's 2.1 has the cuda one
        scaler = torch.amp.GradScaler("cuda") if hasattr(torch.amp, "GradScaler") else torch.cuda.amp.GradScaler()
    return torch.autocast("cuda", dtype=dtype), scaler
