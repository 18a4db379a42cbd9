"""Headless rendering: the infotext in the WebUI's format (parsed back the way the WebUI parses it),
the samplers' maths, and txt2img on the tiny hosts with a trained LoRA applied at a weight and taken
off again. With a WebUI given (LORA_MAKER_WEBUI_DIR, LORA_MAKER_WEBUI_PYTHON), the same renders are
compared with the WebUI's own txt2img and its own infotext parser."""

from __future__ import annotations

import contextlib
import json
import math
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import add_image
from tiny_hosts import make_checkpoint
from webui_env import MODEL_KINDS, PYTHON, WEBUI, needs_webui

from lora_trainer_ext.errors import LoraMakerError
from lora_trainer_ext.grids.plan import Cell, Epoch, RenderSettings
from lora_trainer_ext.grids.renderer import format_infotext
from lora_trainer_ext.hosts.host import SD1, SD2, SDXL
from lora_trainer_ext.hosts.standalone import load_checkpoint
from lora_trainer_ext.hosts.standalone_render import NoiseSchedule, StandaloneRenderer, sample_dpmpp_2m, sample_euler
from lora_trainer_ext.training import lora_file
from lora_trainer_ext.training.model_mode import parameter_fingerprint
from lora_trainer_ext.training.settings import TrainSettings
from lora_trainer_ext.training.trainer import train

pytestmark = pytest.mark.timeout(300)

TINY = RenderSettings(steps=4, width=64, height=64)
NO_LORA = Epoch(0, "none", Path("does-not-exist.safetensors"))  # never read at weight 0

# -- the infotext -------------------------------------------------------------------------------------

# The WebUI's grammar of the parameters line (modules/infotext_utils.py): "Key: value" fields split at
# commas, where a value is either a JSON string or runs to the next comma; a size value is WxH.
FIELD = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
SIZE = re.compile(r"^(\d+)x(\d+)$")


def parse_infotext(text: str) -> dict[str, str]:
    """What `parse_generation_parameters` reads from an infotext (prompt, negative, fields)."""
    *lines, last = text.strip().split("\n")
    if len(FIELD.findall(last)) < 3:
        lines, last = [*lines, last], ""
    prompt, negative, in_negative = [], [], False
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[16:].strip()
        (negative if in_negative else prompt).append(line)
    out = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for key, value in FIELD.findall(last):
        if value[:1] == '"' and value[-1:] == '"':
            value = json.loads(value)
        size = SIZE.match(value)
        if size:
            out[f"{key}-1"], out[f"{key}-2"] = size.groups()
        else:
            out[key] = value
    return out


def cell(weight=0.8, prompt="mychar, 1girl, red hair", negative="lowres, bad hands", seed=1234, epoch=None):
    return Cell(0, 0, 0, epoch or Epoch(4, "mychar-000004", Path("mychar-000004.safetensors")), weight, prompt,
                negative, seed)


def test_infotext_is_the_webuis_layout():
    text = format_infotext(cell(), RenderSettings(), "tiny-sd1", "0123456789", schedule="Karras",
                           lora_hash="abcdef012345", version="v1.10.1")
    assert text == (
        "mychar, 1girl, red hair, <lora:mychar-000004:0.8>\n"
        "Negative prompt: lowres, bad hands\n"
        "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1234, Size: 512x512, "
        'Model hash: 0123456789, Model: tiny-sd1, Lora hashes: "mychar-000004: abcdef012345", Version: v1.10.1'
    )
    baseline = format_infotext(cell(weight=0, negative=""), RenderSettings(cfg_scale=5.5), "m", "", clip_skip=2,
                               lora_hash="abcdef012345", extra={"RNG": "CPU"})
    assert baseline == ("mychar, 1girl, red hair\n"
                        "Steps: 20, Sampler: DPM++ 2M, Schedule type: Automatic, CFG scale: 5.5, Seed: 1234, "
                        "Size: 512x512, Model: m, Clip skip: 2, RNG: CPU")


def test_infotext_parses_back_to_the_same_fields():
    tricky = cell(prompt="mychar, (smile:1.2), sign saying \"hi\"", negative="lowres,\nworst quality", seed=7)
    settings = RenderSettings(sampler="Euler", steps=12, cfg_scale=6.5, width=640, height=384)
    text = format_infotext(tricky, settings, "model, v2: final", "0123456789", lora_hash="abcdef012345",
                           extra={"RNG": "CPU"}, version="v1.10.1")
    assert parse_infotext(text) == {
        "Prompt": tricky.full_prompt(), "Negative prompt": "lowres,\nworst quality",
        "Steps": "12", "Sampler": "Euler", "Schedule type": "Automatic", "CFG scale": "6.5", "Seed": "7",
        "Size-1": "640", "Size-2": "384", "Model hash": "0123456789", "Model": "model, v2: final",
        "RNG": "CPU", "Lora hashes": "mychar-000004: abcdef012345", "Version": "v1.10.1",
    }


# -- the samplers' maths ----------------------------------------------------------------------------------

def test_schedules_span_the_models_sigmas():
    ac = torch.cumprod(1 - torch.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2, 0)
    schedule = NoiseSchedule(ac)
    sigma = ((1 - ac) / ac) ** 0.5
    for label in ("Uniform", "Karras", "Exponential"):
        sigmas = schedule.sigmas(label, 10)
        assert len(sigmas) == 11 and sigmas[-1] == 0 and all(a > b for a, b in zip(sigmas, sigmas[1:]))
        assert sigmas[0] == pytest.approx(float(sigma[-1]), rel=1e-5)
        assert sigmas[-2] == pytest.approx(float(sigma[0]), rel=1e-5)
    assert [round(schedule.sigma_to_t(float(sigma[t])), 3) for t in (0, 1, 500, 999)] == [0, 1, 500, 999]
    # what defines each: evenly spaced timesteps, sigma^(1/7) (Karras' rho 7), log sigma
    for label, f in [("Uniform", schedule.sigma_to_t), ("Karras", lambda v: v ** (1 / 7)), ("Exponential", math.log)]:
        steps = np.diff([f(v) for v in schedule.sigmas(label, 10)[:-1]])
        assert np.allclose(steps, steps[0], rtol=1e-4), label


def test_samplers_solve_the_probability_flow_ode():
    """Data ~ N(0, s^2): the exact denoiser is x s^2/(s^2+sigma^2), and the ODE carries x(sigma_max) to
    x(sigma_max) * s / sqrt(s^2 + sigma_max^2). Euler converges at first order, DPM++ 2M far faster.
    (Both agree with k-diffusion's sample_euler / sample_dpmpp_2m to 1e-6; checked by hand, as
    k-diffusion is not a dependency.)"""
    s = 0.5
    schedule = NoiseSchedule(torch.cumprod(1 - torch.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2, 0))
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def error(sampler, steps):
        sigmas = schedule.sigmas("Karras", steps)
        start = x * sigmas[0]
        exact = start * s / math.sqrt(s**2 + sigmas[0] ** 2)
        out = sampler(lambda v, sigma: v * s**2 / (s**2 + sigma**2), start, sigmas)
        return float((out - exact).abs().max() / exact.abs().max())

    assert 1.8 < error(sample_euler, 20) / error(sample_euler, 40) < 2.2  # first order: half the error
    assert error(sample_euler, 40) < 0.05
    assert error(sample_dpmpp_2m, 40) < min(5e-3, error(sample_euler, 40) / 10)
    # a point mass: every step points straight at it, and both land on it exactly
    target = torch.full_like(x, 0.25)
    for sampler in (sample_euler, sample_dpmpp_2m):
        assert torch.allclose(sampler(lambda v, sigma: target, x * 14.6, schedule.sigmas("Uniform", 5)), target)


# -- txt2img on the tiny hosts ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    return load_checkpoint(make_checkpoint(tmp_path_factory.mktemp("sd1"), SD1))


@pytest.fixture(scope="module")
def trained(sd1, tmp_path_factory):
    """A LoRA (UNet + text encoder) trained for one epoch on the tiny SD1 host."""
    from lora_trainer_ext.project import Project

    project = Project.open(tmp_path_factory.mktemp("projects"), "mychar", create=True)
    for i, caption in enumerate(["mychar, 1girl, red hair", "mychar, 1girl, smile", "mychar, cat", "mychar, dress"]):
        add_image(project, f"{i}.png", caption, size=(64, 64), seed=i)
    settings = TrainSettings.from_dict(dict(resolution=64, min_bucket=64, max_bucket=64, repeats=2, epochs=1,
                                            batch_size=2, dim=4, alpha=4, mixed_precision="no", unet_lr=1e-2,
                                            text_encoder_lr=1e-3, lr_scheduler="constant", min_snr_gamma=0.0))
    result = train(project, sd1, settings, tmp_path_factory.mktemp("lora"))
    return Epoch(1, result.final.stem, result.final)


def pixels(rendered) -> np.ndarray:
    return np.asarray(rendered.image, dtype=np.float64)


def test_a_seed_fixes_the_image(sd1):
    renderer = StandaloneRenderer(sd1)
    for sampler in ("Euler", "DPM++ 2M"):
        settings = RenderSettings(sampler=sampler, steps=4, width=64, height=128)
        first = renderer.render(cell(weight=0, seed=5, epoch=NO_LORA), settings)
        assert first.image.size == (64, 128) and first.image.mode == "RGB"
        assert first.image.tobytes() == renderer.render(cell(weight=0, seed=5, epoch=NO_LORA), settings).image.tobytes()
        assert np.abs(pixels(first) - pixels(renderer.render(cell(weight=0, seed=6, epoch=NO_LORA), settings))).mean() > 1
        info = first.infotext.splitlines()[-1]
        assert f"Sampler: {sampler}, Schedule type: {'Karras' if sampler == 'DPM++ 2M' else 'Automatic'}" in info
        assert "Seed: 5, Size: 64x128" in info and "RNG: CPU" in info and "Lora hashes" not in info
        assert f"Model hash: {sd1.model_hash}, Model: tiny-sd1" in info


def test_what_the_sampler_cannot_do_is_refused(sd1):
    renderer = StandaloneRenderer(sd1)
    for settings, words in [(RenderSettings(sampler="Euler a"), "choose Euler or DPM.. 2M"),
                            (RenderSettings(sampler="Euler", scheduler="Beta"), "schedule type"),
                            (RenderSettings(sampler="Euler", width=520), "multiples of 64")]:
        with pytest.raises(LoraMakerError, match=words):
            renderer.render(cell(weight=0, epoch=NO_LORA), settings)
    with pytest.raises(LoraMakerError, match="LoRA file not found"):
        renderer.render(cell(weight=1, epoch=NO_LORA), TINY)


@contextlib.contextmanager
def merged(loaded, weight: float):
    """The LoRA merged into the host's weights at `weight` (W += weight * alpha/rank * up @ down), as the
    WebUI applies a <lora:...>, and the weights put back afterwards."""
    saved = []
    with torch.no_grad():
        for part in loaded.network.parts:
            for module in part.lycoris.loras:
                layer = module.org_module[0]
                up, down = module.lora_up.weight, module.lora_down.weight
                saved.append((layer, layer.weight.clone()))
                layer.weight += weight * module.scale * (up.flatten(1) @ down.flatten(1)).reshape(layer.weight.shape)
    try:
        yield
    finally:
        with torch.no_grad():
            for layer, weight_before in saved:
                layer.weight.copy_(weight_before)


def test_the_lora_applies_at_its_weight_and_comes_off_again(sd1, trained):
    renderer = StandaloneRenderer(sd1)
    before = parameter_fingerprint(sd1)
    bare = renderer.render(cell(weight=0, epoch=trained), TINY)
    at = {w: renderer.render(cell(weight=w, epoch=trained), TINY) for w in (1.0, 0.5)}
    after = renderer.render(cell(weight=0, epoch=trained), TINY)

    assert after.image.tobytes() == bare.image.tobytes()  # nothing of the LoRA stays behind
    assert parameter_fingerprint(sd1) == before
    wrapped = [m for m in (*sd1.unet.modules(), *sd1.text_encoders[0].modules()) if "_lycoris_original_forward" in vars(m)]
    assert not wrapped and not any("forward" in vars(m) for m in sd1.unet.modules())

    def distance(a, b):
        return float(np.abs(pixels(a) - pixels(b)).mean())

    # A trained LoRA changes the picture, at either weight. (How much is no measure of the weight: on
    # the random tiny model half the weight may move the picture as far as the full one.)
    assert distance(bare, at[1.0]) > 0.5 and distance(bare, at[0.5]) > 0.5 and distance(at[0.5], at[1.0]) > 0.5
    # The weight is the WebUI's: each image is the bare model's with the LoRA merged in at that weight (and
    # the prompt the WebUI conditions on: the LoRA's tag taken out leaves the ", " before it).
    loaded = renderer.lora(trained.path)
    for weight, image in at.items():
        with merged(loaded, weight):
            same = renderer.render(cell(weight=0, prompt="mychar, 1girl, red hair, ", epoch=trained), TINY)
        assert distance(same, image) < 0.1, weight
    assert parameter_fingerprint(sd1) == before

    assert f'Lora hashes: "{trained.lora}: ' in at[0.5].infotext
    assert at[0.5].infotext.startswith(f"mychar, 1girl, red hair, <lora:{trained.lora}:0.5>\n")
    _, metadata = lora_file.read_lora(trained.path)
    assert metadata["sshs_model_hash"][:12] in at[1.0].infotext


def test_a_rewritten_file_is_read_again(sd1, trained, tmp_path):
    renderer = StandaloneRenderer(sd1)
    copy = Epoch(1, "copy", tmp_path / "copy.safetensors")
    copy.path.write_bytes(trained.path.read_bytes())
    first = renderer.render(cell(weight=1, epoch=copy), TINY)
    tensors, metadata = lora_file.read_lora(trained.path)
    lora_file.save_lora(copy.path, {k: v * 3 if k.endswith("lora_up.weight") else v for k, v in tensors.items()},
                        {k: v for k, v in metadata.items() if not k.startswith("sshs_")})
    assert renderer.render(cell(weight=1, epoch=copy), TINY).image.tobytes() != first.image.tobytes()


@pytest.mark.parametrize("kind", [SD2, SDXL])
def test_v_prediction_and_sdxl_render(kind, tmp_path):
    host = load_checkpoint(make_checkpoint(tmp_path, kind, v_prediction=kind == SD2))
    renderer = StandaloneRenderer(host)
    before = parameter_fingerprint(host)
    images = [renderer.render(cell(weight=0, prompt=p, negative=n, epoch=NO_LORA), TINY)
              for p, n in [("mychar, smile", ""), ("mychar, smile", ""), ("cat, outdoors", "lowres")]]
    assert images[0].image.tobytes() == images[1].image.tobytes()
    assert images[0].image.tobytes() != images[2].image.tobytes()
    assert pixels(images[0]).std() > 1  # a picture, not a flat field
    assert parameter_fingerprint(host) == before


# -- against the real WebUI -------------------------------------------------------------------------------

CASES = [  # sampler, schedule, prompt, negative, cfg, steps, weight
    ("Euler", "Automatic", "mychar, 1girl, smile", "lowres", 7, 6, 0),
    ("Euler", "Automatic", "mychar, (smile:1.3), [red hair] BREAK outdoors", "(lowres:1.2)", 7, 6, 0),
    ("DPM++ 2M", "Automatic", "mychar, 1girl, smile", "", 7, 6, 0),
    ("DPM++ 2M", "Exponential", "mychar, red hair", "bad", 1, 5, 0),
    ("Euler", "Automatic", "mychar, 1girl, smile", "lowres", 7, 6, 0.7),
    ("DPM++ 2M", "Automatic", "mychar, 1girl, smile", "", 5.5, 6, 1),
]
# Run in the WebUI's Python from its folder: its txt2img (RNG on the CPU, LoRAs from argv[2]) renders
# each case, and its own parser reads our infotexts (argv[4]); results go to argv[3] as JSON.
WEBUI_SCRIPT = """
import json, sys
args = sys.argv[1:]
sys.argv = [sys.argv[0], "--skip-prepare-environment", "--skip-install", "--skip-version-check", "--use-cpu", "all",
            "--no-half", "--precision", "full", "--no-download-sd-model", "--skip-load-model-at-start",
            "--ckpt", args[0], "--lora-dir", args[1]]
sys.path.insert(0, ".")
from modules import initialize
initialize.imports(); initialize.check_versions(); initialize.initialize()
from modules import infotext_utils, processing, script_callbacks, sd_models, shared
script_callbacks.before_ui_callback()
shared.opts.live_previews_enable = False  # SDXL's previews would fetch a decoder the WebUI does not ship
sd_models.load_model()
shared.opts.randn_source = "CPU"
cases, ours = json.loads(open(args[3]).read())
out = {"images": [], "parsed": [infotext_utils.parse_generation_parameters(t) for t in ours]}
for sampler, schedule, prompt, negative, cfg, steps, weight in cases:
    if weight:
        prompt += f", <lora:lora:{weight}>"
    p = processing.StableDiffusionProcessingTxt2Img(prompt=prompt, negative_prompt=negative, steps=steps, width=64,
        height=64, seed=4321, sampler_name=sampler, scheduler=schedule, cfg_scale=cfg, do_not_save_samples=True,
        do_not_save_grid=True)
    out["images"].append(processing.process_images(p).images[0].tobytes().hex())
open(args[2], "w").write(json.dumps(out, default=str))
"""


@needs_webui
@pytest.mark.timeout(600)
@pytest.mark.parametrize("model", MODEL_KINDS)
def test_renders_and_infotexts_match_the_webuis_txt2img(tmp_path, webui_models, model):
    from lora_trainer_ext.training.network import Network, NetworkConfig

    checkpoint = webui_models.checkpoint(model)
    host = load_checkpoint(Path(checkpoint))
    network = Network(host, NetworkConfig("locon", 4, 2.0, 2, 1.0), train_text_encoder=host.kind != SDXL)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(0)
        for p in network.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    (tmp_path / "lora").mkdir()
    lora = tmp_path / "lora" / "lora.safetensors"
    metadata = lora_file.lora_metadata(host.kind, "eps", lora_file.NetworkInfo(4, 2.0, 2, 1.0), {"output_name": "lora"})
    lora_file.save_lora(lora, lora_file.to_output_names(network.lora_state_dict(), host.kind, network.module_paths()),
                        metadata)

    renderer = StandaloneRenderer(host)
    ours = []
    for sampler, schedule, prompt, negative, cfg, steps, weight in CASES:
        settings = RenderSettings(sampler=sampler, scheduler=schedule, steps=steps, cfg_scale=cfg, width=64, height=64)
        ours.append(renderer.render(Cell(0, 0, 0, Epoch(1, "lora", lora), weight, prompt, negative, 4321), settings))
    (tmp_path / "in.json").write_text(json.dumps([CASES, [r.infotext for r in ours]]), encoding="utf-8")
    run = subprocess.run([PYTHON, "-c", WEBUI_SCRIPT, checkpoint, str(tmp_path / "lora"), str(tmp_path / "out.json"),
                          str(tmp_path / "in.json")], cwd=WEBUI, env=webui_models.run_env(tmp_path), capture_output=True,
                         text=True, timeout=540)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    webui = json.loads((tmp_path / "out.json").read_text(encoding="utf-8"))

    for case, mine, theirs, parsed in zip(CASES, ours, webui["images"], webui["parsed"]):
        reference = np.frombuffer(bytes.fromhex(theirs), dtype=np.uint8).reshape(64, 64, 3).astype(np.float64)
        # the same picture up to float noise (a LoRA-free and a LoRA render differ by 6-8 on this model); a
        # LoRA cell's prompt keeps the ", " before its tag, as the WebUI's does
        assert np.abs(pixels(mine) - reference).mean() < 0.6, case
        expected = parse_infotext(mine.infotext)
        assert {k: str(parsed[k]) for k in expected} == expected, case
