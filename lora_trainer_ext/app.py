"""LoRA Maker without the WebUI: the same tab and API in a gradio app of their own, training on a
checkpoint file (`python -m lora_trainer_ext ui --checkpoint FILE`). The browser tests drive it.

The page gets the tab's JavaScript and CSS the way the WebUI injects extension files (a wrapped
template response), plus the few WebUI helpers they use (`gradioApp`, `onUiLoaded`, `updateInput`).
"""

from __future__ import annotations

from pathlib import Path

from .studio import Studio

EXTENSION_ROOT = Path(__file__).resolve().parent.parent

# The WebUI's script.js/ui.js helpers the tab's script relies on, for pages the WebUI did not build.
_WEBUI_SHIM = """
if (typeof gradioApp !== "function") {
  var gradioApp = function () {
    const app = document.getElementsByTagName("gradio-app")[0];
    return app ? (app.shadowRoot || app) : document;
  };
  var loraMakerLoadedCallbacks = [];
  var onUiLoaded = function (callback) { loraMakerLoadedCallbacks.push(callback); };
  var updateInput = function (target) {
    const event = new Event("input", {bubbles: true});
    Object.defineProperty(event, "target", {value: target});
    target.dispatchEvent(event);
  };
  const waitForUi = setInterval(function () {
    if (!gradioApp().querySelector("#tab_lora_maker")) return;
    clearInterval(waitForUi);
    loraMakerLoadedCallbacks.forEach(function (callback) { callback(); });
  }, 100);
}
"""


def _inject_page_assets() -> None:
    """Put the tab's script and stylesheet into every page gradio serves (as the WebUI does)."""
    import gradio as gr

    templates = gr.routes.templates
    if getattr(templates, "lora_maker_injected", False):
        return
    original = templates.TemplateResponse
    script = _WEBUI_SHIM + (EXTENSION_ROOT / "javascript" / "lora_maker.js").read_text(encoding="utf-8")
    style = (EXTENSION_ROOT / "style.css").read_text(encoding="utf-8")

    def response(*args, **kwargs):
        res = original(*args, **kwargs)
        res.body = res.body.replace(b"</head>", f"<script>{script}</script></head>".encode())
        res.body = res.body.replace(b"</body>", f"<style>{style}</style></body>".encode())
        res.init_headers()
        return res

    templates.TemplateResponse = response
    templates.lora_maker_injected = True


def create_app(studio: Studio):
    """The gradio Blocks: one "LoRA Maker" tab, as the WebUI shows it. System fonts only (the default
    theme would fetch web fonts)."""
    import gradio as gr

    from .tab import build_tab

    _inject_page_assets()
    tab = build_tab(studio)  # built outside the page, then rendered into it, as the WebUI does
    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                              font_mono=["ui-monospace", "monospace"])
    with gr.Blocks(title="LoRA Maker", theme=theme, analytics_enabled=False) as demo:
        with gr.Tabs(elem_id="tabs"):
            with gr.TabItem("LoRA Maker", id="lora_maker", elem_id="tab_lora_maker"):
                tab.render()
    return demo


def launch(studio: Studio, host: str = "127.0.0.1", port: int | None = None, credentials: dict | None = None,
           block: bool = True):
    """Serve the tab and the API (`/lora-maker/v1/`), both behind `credentials` (user: password) when
    given; returns (demo, app, url) when not blocking."""
    from . import api

    demo = create_app(studio)
    demo.queue(64)
    app, url, _ = demo.launch(server_name=host, server_port=port, prevent_thread_lock=True, quiet=True,
                              show_api=False, auth=list(credentials.items()) if credentials else None)
    api.add_routes(app, studio, credentials)
    if block:
        demo.block_thread()
    return demo, app, url
