"""Run inside a real WebUI 1.10.x's Python, from its folder (tests/test_webui_host.py starts it, once per
model kind): brings the WebUI up in-process as webui.py does, then trains a LoRA and a LoCon on its loaded
model through `lora_trainer_ext.webui.host` and writes its findings as JSON for the test to check.
LoRA files go to a Lora folder of its own (--lora-dir), so nothing is left in the WebUI's.

    python webui_session.py REPO OUT_DIR CHECKPOINT RESULT_JSON [WEBUI_FLAG ...]
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys

FLAGS = ["--skip-prepare-environment", "--skip-install", "--skip-version-check", "--use-cpu", "all", "--no-half",
         "--precision", "full", "--no-download-sd-model", "--skip-load-model-at-start"]


def start_webui(checkpoint: str, *flags: str):
    """Bring the WebUI up in this process as webui.py does (plus `flags`); returns its loaded model."""
    sys.argv = [sys.argv[0], *FLAGS, *flags, "--ckpt", checkpoint]  # parsed by modules.shared_cmd_options on import
    sys.path.insert(0, os.getcwd())
    from modules import initialize

    initialize.imports()
    initialize.check_versions()
    initialize.initialize()
    from modules import script_callbacks, sd_models, shared

    script_callbacks.before_ui_callback()  # the built-in Lora registers <lora:...> here
    # Live previews would fetch SDXL's approximate decoder (the WebUI ships SD1's only): no network here.
    shared.opts.live_previews_enable = False
    sd_models.load_model()
    return shared.sd_model


class UnmatchedKeys(logging.Handler):
    """The Lora extension's "didn't match keys" reports (it logs them at DEBUG) of the files it loads."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.reports: list[str] = []
        logging.getLogger().addHandler(self)
        logging.getLogger().setLevel(logging.DEBUG)

    def emit(self, record):
        message = record.getMessage()
        if "didn't match keys" in message:
            self.reports.append(message)


def render(prompt: str):
    from modules import processing, shared

    p = processing.StableDiffusionProcessingTxt2Img(
        sd_model=shared.sd_model, prompt=prompt, steps=2, width=64, height=64, seed=1, sampler_name="Euler",
        do_not_save_samples=True, do_not_save_grid=True)
    image = processing.process_images(p).images[0]
    return hashlib.sha256(image.tobytes()).hexdigest()


def refresh_loras() -> None:
    import networks

    networks.list_available_networks()


# Captions whose conditioning must be the same on both hosts (tests/test_webui_host.py computes ours):
# emphasis, nesting, escapes, unbalanced brackets, BREAK, a caption past 75 tokens, in one batch.
PARITY_CAPTIONS = [
    "mychar, (smile:1.2), [red hair], ((blue eyes)), \\(literal\\) tag BREAK outdoors, sky",
    "BREAK a photo of a (cat, (dog:0.7)) with (unbalanced",
    ", ".join(["1girl", "solo", "(long hair:1.3)", "red eyes", "looking at viewer", "smile", "dress"] * 9),
]


def broken_names(found: dict) -> None:
    """A WebUI without a name LoRA Maker relies on: the check names it, the tab says so and keeps training
    and grids off, and the Studio refuses to start either."""
    import gradio as gr
    import networks

    from lora_trainer_ext.errors import LoraMakerError
    from lora_trainer_ext.tab import build_tab
    from lora_trainer_ext.webui import compat, studio

    found["host_problem"] = compat.host_problem()
    saved = networks.network_apply_weights
    del networks.network_apply_weights  # as a WebUI that renamed it would have it
    compat.host_problem.cache_clear()
    try:
        problem = compat.host_problem()
        found["problem_when_renamed"] = problem
        tab = build_tab(studio._build())
        shown = {c.elem_id: c for c in tab.blocks.values() if isinstance(c, (gr.HTML, gr.Button))}
        found["tab_shows"] = shown["lora_maker_host_problem"].value
        found["start_buttons_interactive"] = [shown[i].interactive for i in ("lora_maker_train_start",
                                                                               "lora_maker_test_render")]
        try:
            studio._build().start_training("anything")
            found["studio_refused"] = ""
        except LoraMakerError as e:
            found["studio_refused"] = str(e)
    finally:
        networks.network_apply_weights = saved
        compat.host_problem.cache_clear()


# SDXL's size conditioning of those captions: (original, crop top-left, target), as (height, width).
PARITY_SIZES = [((64, 64), (0, 0), (64, 64)), ((96, 64), (16, 0), (64, 64)), ((64, 128), (0, 0), (64, 128))]


def conditioning_tensors(host, captions, sizes) -> dict:
    """A host's conditioning of `captions` as named tensors (SDXL: its crossattn and vector)."""
    from lora_trainer_ext.hosts.host import SizeInfo

    cond = host.conditioning(captions, [SizeInfo(*s) for s in sizes] if host.kind == "sdxl" else None)
    return {k: v.contiguous() for k, v in (cond.items() if isinstance(cond, dict) else [("crossattn", cond)])}


def embedder_attributes(sd_model) -> list[dict]:
    """Every plain attribute of SDXL's conditioner embedders (ucg_rate, ...), to see training leave them."""
    embedders = getattr(getattr(sd_model, "conditioner", None), "embedders", [])
    return [{k: repr(v) for k, v in vars(e).items() if isinstance(v, (bool, int, float, str, type(None)))}
            for e in embedders]


def text_encoder_parity(host, path: str, name: str) -> list[float]:
    """[how far the WebUI's conditioning with LoRA file `path` applied (its Lora extension merging it) is from
    ours with the same file attached as training attaches it, how far from no LoRA at all]: the text
    encoders' LoRA modules act on the layers they were trained on, q, k and v in their thirds of OpenCLIP's
    fused attention included."""
    import networks
    import torch

    from lora_trainer_ext.training import lora_file
    from lora_trainer_ext.training.network import Network, NetworkConfig

    captions, sizes = PARITY_CAPTIONS[:2], PARITY_SIZES[:2]
    with torch.no_grad():
        plain = conditioning_tensors(host, captions, sizes)["crossattn"]
        networks.load_networks([name], [1.0], [1.0], [None])
        theirs = conditioning_tensors(host, captions, sizes)["crossattn"]
        networks.load_networks([])
        conditioning_tensors(host, captions, sizes)  # a forward: the Lora extension puts its backups back
        network = Network(host, NetworkConfig("lora", 4, 4), train_text_encoder=True)
        tensors, _ = lora_file.read_lora(path)
        network.load_lora_state_dict(lora_file.from_output_names(
            {k: v.float() for k, v in tensors.items()}, host.kind, network.module_paths()))
        network.attach()
        try:
            ours = conditioning_tensors(host, captions, sizes)["crossattn"]
        finally:
            network.detach()
    return [(ours - theirs).abs().max().item(), (plain - theirs).abs().max().item()]


def medvram_state(sd_model) -> list:
    """[swap hooks, the VAE's encode/decode wrapped, the model's lowvram flag] of --medvram's mode."""
    from lora_trainer_ext.webui.medvram import swap_hooks

    vae = sd_model.first_stage_model
    return [len(swap_hooks(sd_model)), "encode" in vae.__dict__ and "decode" in vae.__dict__,
            bool(getattr(sd_model, "lowvram", False))]


def main(repo: str, out_dir: str, checkpoint: str, *flags: str) -> dict:
    lora_dir = os.path.join(out_dir, "lora")
    sd_model = start_webui(checkpoint, "--lora-dir", lora_dir, *flags)
    sys.path.insert(0, repo)
    import torch
    from modules import shared
    from PIL import Image
    from safetensors.torch import save_file

    from lora_trainer_ext.errors import LoraMakerError
    from lora_trainer_ext.project import Project
    from lora_trainer_ext.training import lora_file
    from lora_trainer_ext.training.model_mode import parameter_fingerprint
    from lora_trainer_ext.training.network import Network, NetworkConfig
    from lora_trainer_ext.training.settings import TrainSettings
    from lora_trainer_ext.training.trainer import train
    from lora_trainer_ext.webui.host import WebuiHost, training_session

    found: dict = {"kind": None}
    unmatched = UnmatchedKeys()
    host = WebuiHost()
    found["kind"] = host.kind
    base = parameter_fingerprint(host)
    save_file(conditioning_tensors(host, PARITY_CAPTIONS, PARITY_SIZES), os.path.join(out_dir, "conditioning.safetensors"))
    if host.kind == "sd1":  # the same for every kind: once is enough
        broken_names(found)
    found["image_base"] = render("a photo of a cat")

    # A LoRA the user had in a prompt is merged into the weights in place.
    torch.manual_seed(0)
    network = Network(host, NetworkConfig("lora", 4, 4), train_text_encoder=bool(host.text_encoders))
    for p in network.parameters():
        torch.nn.init.normal_(p, std=0.05)
    tensors = lora_file.to_output_names(network.lora_state_dict(), host.kind, network.module_paths())
    meta = lora_file.lora_metadata(host.kind, host.parameterization, lora_file.NetworkInfo(4, 4), {"output_name": "merged"})
    lora_file.save_lora(os.path.join(lora_dir, "lm-merged.safetensors"), tensors, meta)
    refresh_loras()
    found["image_merged"] = render("a photo of a cat <lora:lm-merged:1>")
    found["merged_changed_weights"] = parameter_fingerprint(host) != base

    # Refusals come before anything changes.
    from modules import devices, sd_models, sd_unet

    for label, obj, attr, value in [("lowvram", shared.cmd_opts, "lowvram", True),
                                    ("custom_unet", sd_unet, "current_unet", object()), ("fp8", devices, "fp8", True),
                                    ("sd3", sd_model, "is_sd3", True), ("no_model", sd_models.model_data, "sd_model", None)]:
        before = getattr(obj, attr)
        setattr(obj, attr, value)
        try:
            WebuiHost()
            found[f"{label}_refused"] = ""
        except LoraMakerError as e:
            found[f"{label}_refused"] = str(e)
        setattr(obj, attr, before)

    project = Project.open(os.path.join(out_dir, "projects"), "webui-test", create=True)
    for i, colour in enumerate(["red", "blue", "green", "white"]):
        Image.new("RGB", (64, 64) if i % 2 else (64, 96), colour).save(project.dataset_dir / f"{i}.png")
        (project.dataset_dir / f"{i}.txt").write_text(f"mychar, ({colour} background:1.1)", encoding="utf-8")
    settings = TrainSettings.from_dict({
        "resolution": 64, "min_bucket": 64, "max_bucket": 128, "repeats": 2, "epochs": 2, "batch_size": 1, "dim": 4,
        "alpha": 4, "conv_dim": 2, "conv_alpha": 1, "unet_lr": 1e-3, "text_encoder_lr": 1e-4, "mixed_precision": "no",
        "lr_scheduler": "constant", "min_snr_gamma": 0})
    host = WebuiHost()
    rng = torch.get_rng_state()
    embedders = embedder_attributes(sd_model)
    # Token merging left patched in (by an extension; a generation removes its own): out for the run only.
    sd_models.apply_token_merging(sd_model, 0.5)
    found["tome_patched_before"] = sum(type(m).__name__ == "ToMeBlock" for m in host.unet.modules())
    tome_in_training, medvram_in_training = set(), []
    found["medvram_before"] = medvram_state(sd_model)

    def watch(status):
        if status.phase == "training":
            tome_in_training.add(sum(type(m).__name__ == "ToMeBlock" for m in host.unet.modules()))
            medvram_in_training.append(medvram_state(sd_model))

    results = {}
    with training_session(host):
        found["unmerged_for_training"] = parameter_fingerprint(host) == base
        for network_type in ("lora", "locon"):
            results[network_type] = train(project, host, settings.replace(network=network_type), lora_dir,
                                          name=f"lm-{network_type}", on_status=watch)
            found[f"unchanged_after_{network_type}"] = parameter_fingerprint(host) == base
    found["torch_rng_kept"] = torch.equal(torch.get_rng_state(), rng)  # the WebUI's own random state is its own
    found["embedders_kept"] = embedder_attributes(sd_model) == embedders
    found["tome_in_training"] = sorted(tome_in_training)
    found["medvram_in_training"], found["medvram_after"] = medvram_in_training[-1], medvram_state(sd_model)
    found["tome_after"] = [getattr(sd_model, "applied_token_merged_ratio", 0),
                           sum(type(m).__name__ == "ToMeBlock" for m in host.unet.modules())]
    sd_models.apply_token_merging(sd_model, 0)
    found["forwards_restored"] = all("forward" not in m.__dict__ for m in host.unet.modules())
    refresh_loras()
    found["image_after"] = render("a photo of a cat")
    found["text_encoder_parity"] = text_encoder_parity(host, os.path.join(lora_dir, "lm-merged.safetensors"), "lm-merged")
    found["unchanged_after_parity"] = parameter_fingerprint(host) == base
    for network_type, result in results.items():
        found[f"files_{network_type}"] = [os.path.basename(p) for p in result.files]
        found[f"steps_{network_type}"] = result.steps
        unmatched.reports.clear()
        found[f"image_{network_type}"] = render(f"a photo of a cat <lora:lm-{network_type}:1>")
        found[f"unmatched_{network_type}"] = list(unmatched.reports)
        import networks

        found[f"loaded_{network_type}"] = [net.name for net in networks.loaded_networks]
        tensors, meta = lora_file.read_lora(result.final)
        found[f"keys_{network_type}"] = sorted({k.split(".")[0] for k in tensors})
        found[f"meta_{network_type}"] = {k: v for k, v in meta.items() if k.startswith(("ss_", "modelspec."))}
    info = shared.sd_model.sd_checkpoint_info
    found["model_hashes"] = [found["meta_lora"].get("ss_sd_model_hash"), found["meta_lora"].get("ss_new_sd_model_hash"),
                             info.hash, info.sha256, hashlib.sha256(open(info.filename, "rb").read()).hexdigest()]
    if host.kind == "sd1":  # pytorch-optimizer under the WebUI's torch, numpy and transformers
        result = train(project, WebuiHost(), settings.replace(optimizer="CAME", max_steps=2), lora_dir, name="lm-came")
        found["came"] = [result.steps, lora_file.read_lora(result.final)[1]["ss_optimizer"]]
    if host.kind == "sdxl":
        found["v_pred"] = noobai_v_pred(info.filename, out_dir)
    return found


def noobai_v_pred(checkpoint: str, out_dir: str) -> dict:
    """A copy of the checkpoint marked v-prediction the NoobAI way (a `v_pred` key; its yaml says eps, as the
    WebUI's default SDXL one does), loaded: what the WebUI samples it as, what LoRA Maker trains it as, and what
    the plan says."""
    import torch
    from modules import sd_models, shared
    from safetensors.torch import load_file, save_file

    from lora_trainer_ext.webui.host import WebuiHost
    from lora_trainer_ext.webui.studio import _model_notes

    state = load_file(checkpoint)
    state["v_pred"] = torch.tensor([])
    marked = os.path.join(out_dir, "noobai-like-vpred.safetensors")
    save_file(state, marked)
    shutil.copy(os.path.splitext(checkpoint)[0] + ".yaml", os.path.splitext(marked)[0] + ".yaml")  # eps, as the default
    sd_models.reload_model_weights(info=sd_models.CheckpointInfo(marked))
    return {"webui": shared.sd_model.parameterization, "host": WebuiHost().parameterization, "notes": _model_notes()}


if __name__ == "__main__":
    repo, out_dir, checkpoint, result, *webui_flags = sys.argv[1:]  # read first: starting the WebUI replaces sys.argv
    found = main(repo, out_dir, checkpoint, *webui_flags)
    with open(result, "w", encoding="utf-8") as f:  # a file: the WebUI takes over stdout's buffering
        json.dump(found, f)
