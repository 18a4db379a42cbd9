"""The WebUI internals LoRA Maker relies on beyond its documented callbacks, checked once at start.

Training and grids reach into the built-in Lora extension (its merged weights, its file list) and the
prompt caches of `processing` (webui-host.md §4). A WebUI version that renamed one of them would make a
run fail half-way, or worse, leave weights merged; so every such name is checked when the tab is
built, and a missing one turns training and grids off with a message that says which.
"""

from __future__ import annotations

import functools
import sys

# (module, dotted attribute): an attribute of the module (or of a class in it). "function:name" is a
# name the function reads or writes (an attribute of the layers it patches, which exist only later).
NEEDED = (
    ("networks", "load_networks"),
    ("networks", "list_available_networks"),
    ("networks", "loaded_networks"),
    ("networks", "network_apply_weights"),
    ("networks", "network_apply_weights:network_current_names"),
    ("modules.processing", "StableDiffusionProcessing.cached_c"),
    ("modules.processing", "StableDiffusionProcessing.cached_uc"),
    ("modules.processing", "StableDiffusionProcessingTxt2Img.cached_hr_c"),
    ("modules.processing", "StableDiffusionProcessingTxt2Img.cached_hr_uc"),
    ("modules.sd_models", "model_data.loaded_sd_models"),
    ("modules.sd_models", "apply_token_merging"),
)


def missing_names(modules: dict[str, object]) -> list[str]:
    """The NEEDED names that `modules` (name -> loaded module) lack, as "module.name". A module that is
    absent altogether is not checked: without the Lora extension, training needs none of its names
    and grids say that the extension is off."""
    missing = []
    for module_name, dotted in NEEDED:
        module = modules.get(module_name)
        if module is not None and not _has(module, dotted):
            missing.append(f"{module_name}.{dotted}")
    return missing


def _has(module: object, dotted: str) -> bool:
    path, _, read = dotted.partition(":")
    obj = module
    for part in path.split("."):
        if not hasattr(obj, part):
            return False
        obj = getattr(obj, part)
    if not read:
        return True
    code = getattr(obj, "__code__", None)  # a name read as an attribute, or as getattr's string
    return code is not None and (read in code.co_names or read in code.co_consts)


@functools.cache
def host_problem() -> str | None:
    """Why training and grids are off in this WebUI (a name they rely on is gone), or None. Asked once
    the WebUI's scripts are loaded (the tab is built after them), then remembered."""
    import importlib

    modules = {name: sys.modules.get(name) for name, _ in NEEDED}
    for name in ("modules.processing", "modules.sd_models"):
        modules[name] = importlib.import_module(name)
    missing = missing_names(modules)
    if not missing:
        return None
    return (f"this WebUI lacks what LoRA Maker's training and grids rely on ({', '.join(missing)}): training and "
            "grids are off. LoRA Maker is made for AUTOMATIC1111 WebUI 1.10.x; update LoRA Maker, or use that WebUI")
