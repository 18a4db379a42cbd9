"""The WebUI adapter: the only part of LoRA Maker that imports the WebUI's `modules.*` (host.py: its
model as a training Host; render.py: its txt2img as a grid renderer; studio.py: the Studio it builds;
settings.py: the Settings page section; compat.py: the internals it relies on, checked at start;
medvram.py: training under --medvram). It may import anything of the package; nothing imports it
but scripts/.

`scripts/lora_maker.py` calls `register()` when the WebUI loads the extension (at start and at every
"Reload UI"); everything else in the package runs (and is tested) without a WebUI. Nothing here may
break the WebUI: a tab that can't be built shows why instead, and failures are logged, not raised.
"""

from __future__ import annotations

import html

TAB = ("LoRA Maker", "lora_maker")  # title, and the id the WebUI shows as #tab_lora_maker


def register() -> None:
    from modules import script_callbacks

    from .settings import add_settings

    script_callbacks.on_ui_settings(add_settings, name="lora_maker_settings")
    script_callbacks.on_ui_tabs(_tabs, name="lora_maker_tab")
    script_callbacks.on_app_started(_add_api, name="lora_maker_api")
    # No on_script_unloaded: the job runner lives in this package, which Reload UI keeps loaded, and the
    # reloaded tab re-attaches to its job. Reload UI interrupts the WebUI's job first, and a GPU job
    # stops and saves on that (studio._mirror_to_state); a download simply goes on. There are no hooks
    # to undo: training patches the model only inside its own run.


def _tabs() -> list:
    import gradio as gr
    from modules import errors

    try:
        from ..tab import build_tab
        from .studio import studio

        return [(build_tab(studio()), *TAB)]
    except Exception as e:  # an optional dependency missing, a bug: the WebUI must still start
        errors.report("LoRA Maker: could not build its tab", exc_info=True)
        with gr.Blocks(analytics_enabled=False) as blocks:
            gr.HTML(f'<div id="lora_maker_load_error" class="lora-maker-error"><p>LoRA Maker could not load: '
                    f'<code>{html.escape(f"{type(e).__name__}: {e}")}</code></p>'
                    "<p>The console has the details. Check that the extension's install finished "
                    "(restart the WebUI to run its install.py again).</p></div>")
        return [(blocks, *TAB)]


def _add_api(demo, app) -> None:
    """The /lora-maker/v1/ routes where the WebUI serves its own API (--api, or --nowebui, when `demo` is
    None), behind the same --api-auth credentials: a WebUI opened to the network without --api exposes
    no API of ours either."""
    from modules import errors, shared

    if not (shared.cmd_opts.api or demo is None):
        return
    try:
        from ..api import add_routes, parse_api_auth
        from .studio import studio

        add_routes(app, studio(), parse_api_auth(shared.cmd_opts.api_auth))
    except Exception:
        errors.report("LoRA Maker: could not add its API routes (/lora-maker/v1/)", exc_info=True)
