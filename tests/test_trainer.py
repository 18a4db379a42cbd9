"""The training loop end to end on the tiny SD1, SD2-v and SDXL hosts (real ldm classes, CPU): files
written, loss falling on a fixed batch, stop and resume giving the same LoRA as an unbroken run, the
host model given back untouched, and every bad input refused before the model is touched."""

from __future__ import annotations

import csv
import hashlib
import os
import stat
import weakref

import pytest
import torch
from conftest import add_image
from tiny_hosts import checkpoints_of_every_kind, make_checkpoint

from lora_trainer_ext.errors import LoraMakerError
from lora_trainer_ext.hosts.host import SD1, SD2, SDXL
from lora_trainer_ext.hosts.standalone import load_checkpoint
from lora_trainer_ext.progress import Control
from lora_trainer_ext.training import lora_file, objective
from lora_trainer_ext.training.model_mode import parameter_fingerprint
from lora_trainer_ext.training.network import Network, NetworkConfig
from lora_trainer_ext.training.settings import TrainSettings
from lora_trainer_ext.training.state import has_state, state_dir
from lora_trainer_ext.training.trainer import train

pytestmark = pytest.mark.timeout(300)

FAST = dict(resolution=64, min_bucket=64, max_bucket=128, bucket_step=64, repeats=2, epochs=2, batch_size=2,
            dim=4, alpha=4, conv_dim=2, conv_alpha=2, mixed_precision="no", unet_lr=1e-3, text_encoder_lr=1e-4,
            lr_scheduler="constant", min_snr_gamma=0.0, save_every_n_epochs=1)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    return checkpoints_of_every_kind(folder)


@pytest.fixture
def dataset(project):
    captions = ["mychar, 1girl, red hair, smile", "mychar, 1girl, blue eyes", "mychar, cat, outdoors",
                "mychar, 1girl, sitting, dress"]
    sizes = [(64, 64), (64, 64), (96, 64), (64, 96)]
    for i, (caption, size) in enumerate(zip(captions, sizes)):
        add_image(project, f"{i}.png", caption, size=size, seed=i)
    project.update_settings(dataset={"activation_tags": ["mychar"], "keep_tokens": 1})
    return project


def settings(**changes) -> TrainSettings:
    return TrainSettings.from_dict({**FAST, **changes})


def test_sd1_run_writes_epochs_final_card_log_and_restores_the_model(dataset, checkpoints, tmp_path):
    host = load_checkpoint(checkpoints[SD1])
    before = parameter_fingerprint(host)
    statuses = []
    torch.manual_seed(1234)  # the host's own random state, e.g. the WebUI's
    rng = torch.get_rng_state()
    result = train(dataset, host, settings(), tmp_path / "lora", on_status=statuses.append)
    assert torch.equal(torch.get_rng_state(), rng)  # training drew from generators of its own

    assert [p.name for p in result.files] == ["demo-000001.safetensors", "demo.safetensors"]
    assert result.final == tmp_path / "lora" / "demo.safetensors" and not result.stopped
    phases = [s.phase for s in statuses]
    assert phases[0] == "plan" and "4 images x 2 repeats x 2 epochs / batch 2" in statuses[0].message
    training = [s for s in statuses if s.phase == "training"]
    assert [s.step for s in training] == list(range(1, result.steps + 1)) and training[-1].epoch == 2
    assert all(s.loss is not None and s.lr == 1e-3 and s.it_per_s for s in training)

    tensors, meta = lora_file.read_lora(result.final)
    assert meta["ss_output_name"] == "demo" and meta["ss_epoch"] == "2" and meta["ss_base_model_version"] == "sd_v1"
    assert meta["ss_mixed_precision"] == "no"  # what ran
    assert meta["ss_sd_model_name"] == checkpoints[SD1].name and meta["modelspec.trigger_phrase"] == "mychar"
    data = checkpoints[SD1].read_bytes()  # kohya's two hashes of a local base model
    assert meta["ss_new_sd_model_hash"] == hashlib.sha256(data).hexdigest()
    assert meta["ss_sd_model_hash"] == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    assert '"mychar": 4' in meta["ss_tag_frequency"]
    assert any(k.startswith("lora_te_") for k in tensors) and any(k.startswith("lora_unet_down_blocks_") for k in tensors)
    assert all(t.dtype == torch.float16 for t in tensors.values())
    card = lora_file.card_path(result.final).read_text(encoding="utf-8")
    assert '"activation text": "mychar"' in card and '"sd version": "SD1"' in card
    umask = os.umask(0o022)
    os.umask(umask)
    for written in (result.final, lora_file.card_path(result.final)):  # readable by a WebUI running as another user
        assert stat.S_IMODE(written.stat().st_mode) == 0o666 & ~umask, written

    rows = list(csv.DictReader(open(result.loss_log, encoding="utf-8")))
    assert len(rows) == result.steps == 8  # (2 buckets of 2 + 2 single images) x 2 repeats / 2 = 4 per epoch
    assert parameter_fingerprint(host) == before
    assert not any(p.requires_grad for p in host.unet.parameters())
    assert all("forward" not in m.__dict__ for m in host.unet.modules())


def fixed_batch_loss(host, network, latents, seed=0):
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(latents.shape, generator=g)
    t = torch.tensor([100, 300, 500, 700])[: len(latents)]
    noisy = objective.add_noise(latents, noise, t, host.alphas_cumprod)
    with torch.no_grad():
        if network:
            network.attach()
        try:
            cond = host.conditioning(["mychar, 1girl, red hair, smile"] * len(latents))
            pred = host.apply_model(noisy, t, cond)
        finally:
            if network:
                network.detach()
    return float(objective.loss(pred, objective.target(latents, noise, t, host.alphas_cumprod, host.parameterization)))


def test_loss_falls_on_a_fixed_batch(project, checkpoints, tmp_path):
    add_image(project, "only.png", "mychar, 1girl, red hair, smile", size=(64, 64), seed=7)
    host = load_checkpoint(checkpoints[SD1])
    result = train(project, host, settings(repeats=80, epochs=1, batch_size=4, unet_lr=1e-2, text_encoder_lr=0, network="locon",
                                           shuffle_tags=False), tmp_path / "lora")
    from lora_trainer_ext.training.data import TrainData

    data = TrainData.from_project(project, settings().resolved(SD1, project), SD1)
    with torch.no_grad():
        latents = host.encode_images(data.pixels(0)[0].unsqueeze(0)).repeat(4, 1, 1, 1)
    network = Network(host, NetworkConfig("locon", 4, 4, 2, 2))
    tensors, _ = lora_file.read_lora(result.final)
    network.load_lora_state_dict(lora_file.from_output_names(
        {k: v.float() for k, v in tensors.items()}, SD1, network.module_paths()))
    base = fixed_batch_loss(host, None, latents)
    trained = fixed_batch_loss(host, network, latents)
    assert trained < 0.8 * base


def test_stop_then_resume_equals_an_unbroken_run(dataset, checkpoints, tmp_path):
    unbroken = train(dataset, load_checkpoint(checkpoints[SD1]), settings(), tmp_path / "a", name="run")

    control = Control()
    host = load_checkpoint(checkpoints[SD1])
    stopped = train(dataset, host, settings(), tmp_path / "b", name="run", control=control,
                    on_status=lambda s: s.phase == "training" and s.step == 3 and control.stop())
    assert stopped.stopped and stopped.steps == 3 and stopped.final is None
    assert (state_dir(dataset) / "state.pt").is_file()
    with pytest.raises(LoraMakerError, match="other settings"):  # a resume with other settings is refused
        train(dataset, host, settings(dim=8), tmp_path / "b", name="run", resume=True)
    resumed = train(dataset, host, settings(), tmp_path / "b", name="run", resume=True)
    assert resumed.steps == unbroken.steps and not resumed.stopped

    a, _ = lora_file.read_lora(unbroken.final)
    b, _ = lora_file.read_lora(resumed.final)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # a finished run leaves nothing to resume
    assert not (state_dir(dataset) / "state.pt").exists()
    with pytest.raises(LoraMakerError, match="nothing to resume"):
        train(dataset, host, settings(), tmp_path / "b", name="run", resume=True)


def test_stop_and_save_and_save_now(dataset, checkpoints, tmp_path):
    control = Control()

    def steer(status):
        if status.phase == "training" and status.step == 2:
            control.save_now()
        if status.phase == "training" and status.step == 5:
            control.stop(save=True)

    result = train(dataset, load_checkpoint(checkpoints[SD1]), settings(), tmp_path / "lora", control=control,
                   on_status=steer)
    assert [p.name for p in result.files] == ["demo-step00000002.safetensors", "demo-000001.safetensors",
                                              "demo-step00000005.safetensors"]
    assert result.stopped and result.steps == 5


def test_an_error_mid_training_leaves_the_model_as_it_was(dataset, checkpoints, tmp_path):
    host = load_checkpoint(checkpoints[SD2])  # use_checkpoint: True in its yaml
    before = parameter_fingerprint(host)
    flags = [(n, m.checkpoint) for n, m in host.unet.named_modules() if hasattr(m, "checkpoint")]

    def boom(status):
        if status.phase == "training" and status.step == 2:
            raise RuntimeError("CUDA out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        train(dataset, host, settings(), tmp_path / "lora", on_status=boom)
    assert parameter_fingerprint(host) == before
    assert [(n, m.checkpoint) for n, m in host.unet.named_modules() if hasattr(m, "checkpoint")] == flags
    assert all("forward" not in m.__dict__ for m in host.unet.modules())


def test_out_of_memory_frees_the_failed_step_before_the_host_is_put_back(dataset, checkpoints, tmp_path,
                                                                         monkeypatch):
    host = load_checkpoint(checkpoints[SD1])
    before = parameter_fingerprint(host)
    grads = [p.requires_grad for p in host.unet.parameters()]
    modes = [m.training for m in host.unet.modules()]
    rng = torch.get_rng_state()
    failed, freed_when_restored = [], []
    real_apply_model = host.apply_model

    def apply_model(latents, timesteps, cond):  # CUDA runs out of memory in the third step's forward
        prediction = real_apply_model(latents, timesteps, cond)
        failed.append(weakref.ref(prediction))
        if len(failed) == 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return prediction

    real_detach = Network.detach

    def detach(network):  # the first of the host's things put back once the loop has failed
        freed_when_restored.append(failed[-1]() is None)
        real_detach(network)

    host.apply_model = apply_model
    monkeypatch.setattr(Network, "detach", detach)
    with pytest.raises(LoraMakerError, match="out of GPU memory: try batch_size=1") as error:
        train(dataset, host, settings(), tmp_path / "lora")
    assert freed_when_restored == [True]  # the failed step's tensors were gone before anything was put back
    assert error.value.__context__ is None and error.value.__cause__ is None  # nothing holds the failed frames
    assert parameter_fingerprint(host) == before
    assert [p.requires_grad for p in host.unet.parameters()] == grads and [m.training for m in host.unet.modules()] == modes
    assert torch.equal(torch.get_rng_state(), rng)


@pytest.mark.parametrize("kind", [SD1, SDXL])
def test_non_finite_latents_or_conditioning_are_named_before_anything_is_learned(dataset, checkpoints, tmp_path, kind):
    host = load_checkpoint(checkpoints[kind])
    for module, part in ((host.vae.encoder.conv_in, "latents for 0.png"),
                         (host.text_encoders[-1].text_model.final_layer_norm, "conditioning for the first batch")):
        saved = module.weight.detach().clone()
        with torch.no_grad():
            module.weight[0] = float("inf")  # what an fp16 overflow gives
        try:
            with pytest.raises(LoraMakerError, match=f"NaN or infinite {part}") as error:
                train(dataset, host, settings(), tmp_path / "lora")
        finally:
            with torch.no_grad():
                module.weight.copy_(saved)
        assert "half precision" in str(error.value)
        assert not list((tmp_path / "lora").glob("*.safetensors")) and not has_state(dataset)


def test_noise_options_train_and_sdxl_v_prediction_gets_zero_terminal_snr(dataset, checkpoints, tmp_path):
    layered = train(dataset, load_checkpoint(checkpoints[SD1]), settings(epochs=1, multires_noise_iterations=6,
                                                                          ip_noise_gamma=0.05), tmp_path / "a")
    _, meta = lora_file.read_lora(layered.final)
    assert (meta["ss_multires_noise_iterations"], meta["ss_multires_noise_discount"], meta["ss_ip_noise_gamma"]) == \
        ("6", "0.3", "0.05")
    assert meta["ss_zero_terminal_snr"] == "False"  # an eps model
    assert {t.dtype for t in lora_file.read_lora(layered.final)[0].values()} == {torch.float16}
    kept = train(dataset, load_checkpoint(checkpoints[SD1]), settings(epochs=1, save_precision="fp32"), tmp_path / "d")
    assert {t.dtype for t in lora_file.read_lora(kept.final)[0].values()} == {torch.float32}
    vpred = load_checkpoint(make_checkpoint(tmp_path / "xl-v", SDXL, v_prediction=True))  # as NoobAI V-Pred
    assert vpred.parameterization == "v"
    result = train(dataset, vpred, settings(epochs=1), tmp_path / "b")
    _, meta = lora_file.read_lora(result.final)
    assert meta["ss_zero_terminal_snr"] == meta["ss_scale_v_pred_loss_like_noise_pred"] == "True"  # auto
    with pytest.raises(LoraMakerError, match="for v-prediction models"):
        train(dataset, load_checkpoint(checkpoints[SDXL]), settings(zero_terminal_snr=True), tmp_path / "c")


def test_two_accumulated_batches_of_2_train_as_one_batch_of_4(project, checkpoints, tmp_path, monkeypatch):
    for i, caption in enumerate(["mychar, smile", "mychar, 1girl", "mychar, red hair", "mychar, cat"]):
        add_image(project, f"{i}.png", caption, size=(64, 64), seed=i)  # one bucket: one step per epoch
    host = load_checkpoint(checkpoints[SD1])
    gradients: list[list[torch.Tensor]] = []
    adamw_step = torch.optim.AdamW.step

    def step(optimizer, *args, **kwargs):  # what each optimizer step is given
        gradients.append([p.grad.clone() for group in optimizer.param_groups for p in group["params"]])
        return adamw_step(optimizer, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    four = train(project, host, settings(batch_size=4, repeats=1, epochs=3), tmp_path / "four")
    two_by_two = train(project, host, settings(batch_size=2, gradient_accumulation_steps=2, repeats=1, epochs=3),
                       tmp_path / "two")
    assert four.steps == two_by_two.steps == 3 and len(gradients) == 6
    # The same images, noise and timesteps in each step: the same losses...
    losses = [[row.split(",")[2] for row in run.loss_log.read_text().splitlines()[1:]] for run in (four, two_by_two)]
    assert [float(x) for x in losses[0]] == pytest.approx([float(x) for x in losses[1]], rel=1e-4)
    # ...and, from the same weights, the same gradient up to float32 noise, which this tiny random model
    # amplifies to a few per cent (without accumulation, or without weighing each batch by its share, they
    # differ by 100% or more). After that, Adam's steps turn that noise into slightly different weights.
    a, b = (torch.cat([g.flatten() for g in run[0]]) for run in (gradients[:3], gradients[3:]))
    assert a.norm() > 0 and (a - b).norm() / a.norm() < 0.1
    a, _ = lora_file.read_lora(four.final)
    b, meta = lora_file.read_lora(two_by_two.final)
    # Adam divides by the gradient's size, so float noise in near-zero gradients can move a weight by up to
    # twice the learning rate: the files agree to that, not to the last bit.
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=2 * 1e-3 * 3) for k in a)
    assert (meta["ss_gradient_accumulation_steps"], meta["ss_total_batch_size"]) == ("2", "4")
    plan = TrainSettings.from_dict({**FAST, "batch_size": 2, "gradient_accumulation_steps": 2})
    from lora_trainer_ext.training.plan import step_arithmetic

    assert step_arithmetic(4, plan).render() == "4 images x 2 repeats x 2 epochs / batch 2 x 2 accumulated = 4 steps"


def test_a_run_continues_from_an_existing_lora_file_of_the_same_network(dataset, checkpoints, tmp_path):
    first = train(dataset, load_checkpoint(checkpoints[SD1]), settings(epochs=1), tmp_path / "first").final
    # with a learning rate of almost nothing, what comes out is what went in: the file's weights were the start
    again = train(dataset, load_checkpoint(checkpoints[SD1]),
                  settings(epochs=1, unet_lr=1e-12, text_encoder_lr=1e-12, network_weights=str(first)), tmp_path / "b")
    a, _ = lora_file.read_lora(first)
    b, _ = lora_file.read_lora(again.final)
    assert a.keys() == b.keys() and all(torch.allclose(a[k].float(), b[k].float(), atol=1e-6) for k in a)
    assert any(a[k].abs().max() > 1e-3 for k in a if "lora_up" in k)  # a trained file, not a fresh one
    for changes, words in ((dict(dim=8), "does not fit this network"), (dict(text_encoder_lr=0.0), "does not fit"),
                           (dict(network_weights=str(tmp_path / "none.safetensors")), "no LoRA file")):
        with pytest.raises(LoraMakerError, match=words):
            train(dataset, load_checkpoint(checkpoints[SD1]), settings(**{"network_weights": str(first), **changes}),
                  tmp_path / "c")
    with pytest.raises(LoraMakerError, match="another model family"):
        train(dataset, load_checkpoint(checkpoints[SDXL]), settings(network_weights=str(first)), tmp_path / "d")
    from lora_trainer_ext.training.plan import training_plan

    plan = training_plan(dataset, settings(network_weights=str(first)), SD1)
    assert any(w.startswith(f"continues from {first.name}: its weights are the start") for w in plan.warnings)


@pytest.mark.parametrize("kind", [SD1, SDXL])
def test_cached_text_encoder_outputs_train_the_same_lora(dataset, checkpoints, tmp_path, kind):
    long = ", ".join(["mychar", "1girl"] + ["red hair", "blue eyes", "smile", "dress", "sky"] * 12)  # 2 chunks
    (dataset.dataset_dir / "0.txt").write_text(long, encoding="utf-8")  # batched with a 1-chunk caption
    host = load_checkpoint(checkpoints[kind])
    plain = settings(epochs=1, text_encoder_lr=0.0, shuffle_tags=False)
    files = {cache: train(dataset, host, plain.replace(cache_text_encoder_outputs=cache), tmp_path / cache).final
             for cache in ("no", "ram", "disk")}
    a, _ = lora_file.read_lora(files["no"])
    for cache in ("ram", "disk"):
        b, _ = lora_file.read_lora(files[cache])
        assert a.keys() == b.keys() and all(torch.allclose(a[k].float(), b[k].float(), atol=1e-4) for k in a), cache
    assert any((state_dir(dataset) / "text").glob("*.pt"))
    with pytest.raises(LoraMakerError, match="cache_text_encoder_outputs needs text_encoder_lr 0"):
        train(dataset, host, plain.replace(cache_text_encoder_outputs="ram", text_encoder_lr=1e-4), tmp_path / "x")
    assert any("captions" in w or "used as written" in w for w in
               settings(cache_text_encoder_outputs="ram", text_encoder_lr=0.0).validate(kind))


@pytest.mark.parametrize("kind, version", [(SD2, "sd_v2_v"), (SDXL, "sdxl_base_v1-0")])
def test_sd2_v_and_sdxl_locon(dataset, checkpoints, tmp_path, kind, version):
    host = load_checkpoint(checkpoints[kind])
    result = train(dataset, host, settings(network="locon", epochs=1, resolution=64, mixed_precision="fp16"),
                   tmp_path / "lora")
    tensors, meta = lora_file.read_lora(result.final)
    assert meta["ss_base_model_version"] == version
    assert meta["ss_mixed_precision"] == "no"  # fp16 was asked for, but autocast exists on CUDA only: fp32 ran
    assert meta["modelspec.implementation_version"].startswith("lora-maker/")
    assert ("modelspec.encoder_layer" in meta) == (kind != SDXL)  # no clip skip applies to SDXL's encoders
    assert ("ss_clip_skip" in meta) == (kind != SDXL)
    assert meta["ss_network_args"] == '{"conv_dim": "2", "conv_alpha": "2.0"}'
    unet_keys = [k for k in tensors if k.startswith("lora_unet_")]
    assert any("_in_layers_2." in k or "_resnets_0_conv1." in k for k in unet_keys)  # LoCon reached the ResBlocks
    if kind == SDXL:  # both text encoders, under kohya's names
        assert any(k.startswith("lora_te1_text_model_encoder_layers_") for k in tensors)
        assert any(k.startswith("lora_te2_text_model_encoder_layers_") for k in tensors)
        assert any(k.startswith("lora_unet_input_blocks_") for k in unet_keys)


def test_bad_input_is_refused_before_the_model_is_touched(project, checkpoints, tmp_path):
    host = load_checkpoint(checkpoints[SD1])
    with pytest.raises(LoraMakerError, match="no images"):
        train(project, host, settings(), tmp_path / "lora")
    add_image(project, "a.png", "x", size=(64, 64))
    add_image(project, "b.png", size=(64, 64), seed=1)
    with pytest.raises(LoraMakerError, match="b.png"):
        train(project, host, settings(), tmp_path / "lora")
    (project.dataset_dir / "b.txt").write_text("y", encoding="utf-8")
    with pytest.raises(LoraMakerError, match="dim"):
        train(project, host, settings(dim=0), tmp_path / "lora")
    with pytest.raises(LoraMakerError, match="resume"):
        train(project, host, settings(), tmp_path / "lora", resume=True)
    assert not (tmp_path / "lora").exists() or not any((tmp_path / "lora").iterdir())


@pytest.mark.parametrize("kind", [SD1, SD2, SDXL])
def test_cli_train(dataset, checkpoints, tmp_path, kind):
    from test_cli import fails, ok, run

    sets = [arg for key, value in FAST.items() for arg in ("--set", f"{key}={value}")]
    common = ["train", "demo", "--checkpoint", str(checkpoints[kind]), "--lora-dir", str(tmp_path / "out"), *sets]
    out = ok(run(*common, "--set", "epochs=1", "--set", "network=locon", root=dataset.root))
    assert "4 images x 2 repeats x 1 epochs / batch 2 = 4 steps" in out and "below the guide's 250-1000" in out
    assert (tmp_path / "out" / "demo.safetensors").is_file() and "done: 4 steps" in out
    if kind == SD1:
        fails(run(*common, "--set", "epoch=3", root=dataset.root), "epoch", "epochs")  # a typo: did you mean
        fails(run("train", "demo", "--checkpoint", str(tmp_path / "missing.safetensors"), root=dataset.root),
              "missing.safetensors")


@pytest.mark.parametrize("kind, network", [(SD1, "lora"), (SD2, "locon"), (SDXL, "locon")])
def test_trained_files_load_in_the_webui_and_comfyui_key_maps(dataset, checkpoints, tmp_path, kind, network):
    """Every key of a file the trainer wrote lands on a layer of the model it was trained on."""
    from lora_consumers import comfy_key_map, webui_key_map, webui_layer_table, webui_text_modules

    host = load_checkpoint(checkpoints[kind])
    result = train(dataset, host, settings(network=network, epochs=1), tmp_path / "lora")
    keys = list(lora_file.read_lora(result.final)[0])
    embedders = webui_text_modules(kind)
    if kind == SD1:
        embedders[0].transformer = host.text_encoders[0]  # the text encoder that was trained
    matched, unmatched = webui_key_map(keys, webui_layer_table(host.unet, embedders, kind))
    assert unmatched == [] and len(matched) == len(keys) // 3
    assert comfy_key_map(keys, host.unet, kind)[1] == []


@pytest.mark.parametrize("optimizer, lr, written", [
    ("AdamW", 1e-3, "torch.optim.adamw.AdamW(weight_decay=0.01)"),
    ("AdamW8bit", 1e-3, "bitsandbytes.optim.adamw.AdamW8bit(weight_decay=0.01)"),
    ("Prodigy", 1.0, "pytorch_optimizer.optimizer.prodigy.Prodigy(weight_decouple=True,weight_decay=0.01,"
                     "betas=(0.9, 0.999),d_coef=2,bias_correction=True,safeguard_warmup=True)"),
    ("CAME", 1e-3, "pytorch_optimizer.optimizer.came.CAME(weight_decay=0.04)"),
])  # fmt: skip
def test_optimizers_train_and_the_file_names_them_with_their_arguments(dataset, checkpoints, tmp_path, optimizer, lr,
                                                                      written):
    result = train(dataset, load_checkpoint(checkpoints[SD1]), settings(optimizer=optimizer, unet_lr=lr, text_encoder_lr=lr,
                                                                        epochs=1), tmp_path / "lora")
    tensors, meta = lora_file.read_lora(result.final)
    assert meta["ss_optimizer"] == written  # as sd-scripts writes it: the class's full name and its arguments
    ups = [t for k, t in tensors.items() if k.endswith("lora_up.weight")]
    assert all(torch.isfinite(t).all() for t in ups) and sum(float(t.abs().sum()) for t in ups) > 0


def test_a_misspelt_optimizer_argument_is_refused_before_anything_runs(dataset, checkpoints, tmp_path):
    with pytest.raises(LoraMakerError, match="Prodigy has no argument 'd_coeff': did you mean d_coef"):
        train(dataset, load_checkpoint(checkpoints[SD1]), settings(optimizer="Prodigy", optimizer_args="d_coeff=2"),
              tmp_path / "lora")
    assert not (tmp_path / "lora").exists() and not has_state(dataset)


def test_trained_sd1_file_loads_in_diffusers_like_the_merged_model(dataset, checkpoints, tmp_path):
    """diffusers' own loader puts every module of a trained file on the layer it was trained on: its
    UNet and text encoder then compute what the tiny host computes with the LoRA merged in."""
    from lora_consumers import import_diffusers
    from test_lora_file import lora_layers, merged

    diffusers = import_diffusers()
    from diffusers.loaders import LoraLoaderMixin
    from diffusers.pipelines.stable_diffusion.convert_from_ckpt import convert_ldm_unet_checkpoint

    host = load_checkpoint(checkpoints[SD1])
    result = train(dataset, host, settings(epochs=1, unet_lr=5e-2, text_encoder_lr=5e-2), tmp_path / "lora")
    tensors, _ = lora_file.read_lora(result.final)
    tensors = {k: v.float() for k, v in tensors.items()}
    paths = Network(host, NetworkConfig("lora", 4, 4), train_text_encoder=True).module_paths()

    dunet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, cross_attention_dim=32, attention_head_dim=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, block_out_channels=(32, 32, 64, 64)).eval()
    dunet.load_state_dict(convert_ldm_unet_checkpoint(
        {f"model.diffusion_model.{k}": v for k, v in host.unet.state_dict().items()}, dunet.config))
    g = torch.Generator().manual_seed(0)
    x, context, t = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 5, 32, generator=g), torch.tensor([500])
    with torch.no_grad():
        before = dunet(x, t, encoder_hidden_states=context).sample
        assert torch.allclose(before, host.unet(x, t, context=context), atol=1e-4)
        state, alphas = LoraLoaderMixin.lora_state_dict(str(result.final))
        LoraLoaderMixin.load_lora_into_unet(state, alphas, dunet, low_cpu_mem_usage=False)
        assert lora_layers(dunet) == sum(k.startswith("lora_unet_") and k.endswith(".alpha") for k in tensors) == 192
        after = dunet(x, t, encoder_hidden_states=context).sample
        expected = merged(host.unet, tensors, SD1, paths)(x, t, context=context)
        assert (after - before).abs().max() > 1e-3 and torch.allclose(after, expected, atol=1e-3)

        te = host.text_encoders[0]
        ids = torch.tensor([[5, 7, 9, 11]])
        expected = merged(te, tensors, SD1, paths, "lora_te")(ids).last_hidden_state
        LoraLoaderMixin.load_lora_into_text_encoder(state, alphas, te, low_cpu_mem_usage=False)
        assert lora_layers(te) == sum(k.startswith("lora_te_") and k.endswith(".alpha") for k in tensors)
        assert torch.allclose(te(ids).last_hidden_state, expected, atol=1e-3)


def test_trained_sdxl_file_loads_in_diffusers(dataset, checkpoints, tmp_path):
    from lora_consumers import import_diffusers
    from test_lora_file import lora_layers, merged

    diffusers = import_diffusers()
    from diffusers.loaders import StableDiffusionXLLoraLoaderMixin as Mixin

    host = load_checkpoint(checkpoints[SDXL])
    result = train(dataset, host, settings(network="locon", epochs=1, unet_lr=5e-2, text_encoder_lr=5e-2),
                   tmp_path / "lora")
    tensors, _ = lora_file.read_lora(result.final)
    tensors = {k: v.float() for k, v in tensors.items()}
    # the tiny SDXL host's UNet in diffusers' form: levels (32, 64, 64), transformers at levels 2 and 3
    dunet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, cross_attention_dim=80, attention_head_dim=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), block_out_channels=(32, 64, 64),
        transformer_layers_per_block=(1, 1, 2), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=16, projection_class_embeddings_input_dim=48 + 6 * 16).eval()
    g = torch.Generator().manual_seed(0)
    x, context, t = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 5, 80, generator=g), torch.tensor([500])
    extra = {"added_cond_kwargs": {"text_embeds": torch.randn(1, 48, generator=g),
                                   "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}}
    with torch.no_grad():
        before = dunet(x, t, encoder_hidden_states=context, **extra).sample
        state, alphas = Mixin.lora_state_dict(str(result.final), unet_config=dunet.config)
        Mixin.load_lora_into_unet(state, alphas, dunet, low_cpu_mem_usage=False)
        assert lora_layers(dunet) == sum(k.startswith("lora_unet_") and k.endswith(".alpha") for k in tensors)
        assert (dunet(x, t, encoder_hidden_states=context, **extra).sample - before).abs().max() > 1e-3

        # Both text encoders, as diffusers loads them from kohya's lora_te1_ / lora_te2_ names.
        paths = Network(host, NetworkConfig("locon", 4, 4, 2, 1), train_text_encoder=True).module_paths()
        ids = torch.tensor([[5, 7, 9, 11]])
        for te, kohya, diffusers_prefix in zip(host.text_encoders, ("lora_te1", "lora_te2"),
                                               ("text_encoder", "text_encoder_2")):
            expected = merged(te, tensors, SDXL, paths, kohya)(ids).last_hidden_state
            Mixin.load_lora_into_text_encoder(state, alphas, te, prefix=diffusers_prefix, low_cpu_mem_usage=False)
            assert lora_layers(te) == sum(k.startswith(kohya + "_") and k.endswith(".alpha") for k in tensors) > 0
            assert torch.allclose(te(ids).last_hidden_state, expected, atol=1e-3)


def test_latents_cached_on_disk_train_the_same_lora(dataset, checkpoints, tmp_path):
    ram = train(dataset, load_checkpoint(checkpoints[SD1]), settings(epochs=1), tmp_path / "ram")
    disk = train(dataset, load_checkpoint(checkpoints[SD1]), settings(epochs=1, cache_latents="disk"), tmp_path / "disk")
    assert len(list((state_dir(dataset) / "latents").glob("*.pt"))) == 4
    a, _ = lora_file.read_lora(ram.final)
    b, _ = lora_file.read_lora(disk.final)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_keep_last_n_epochs_prunes_only_this_runs_files(dataset, checkpoints, tmp_path):
    lora_dir = tmp_path / "lora"
    lora_dir.mkdir()
    for old in ("demo-000009.safetensors", "other-000001.safetensors"):  # an earlier run, another LoRA
        (lora_dir / old).write_bytes(b"keep me")
    result = train(dataset, load_checkpoint(checkpoints[SD1]), settings(epochs=3, keep_last_n_epochs=1), lora_dir)
    assert sorted(p.name for p in lora_dir.glob("*.safetensors")) == [
        "demo-000002.safetensors", "demo-000009.safetensors", "demo.safetensors", "other-000001.safetensors"]
    assert not (lora_dir / "demo-000001.json").exists() and (lora_dir / "demo-000002.json").exists()
    assert [p.name for p in result.files] == ["demo-000001.safetensors", "demo-000002.safetensors", "demo.safetensors"]


def test_resume_refuses_a_changed_dataset(dataset, checkpoints, tmp_path):
    control = Control()
    host = load_checkpoint(checkpoints[SD1])
    train(dataset, host, settings(), tmp_path / "lora", control=control,
          on_status=lambda s: s.phase == "training" and s.step == 2 and control.stop())
    (dataset.dataset_dir / "1.txt").write_text("mychar, 1girl, green eyes", encoding="utf-8")
    with pytest.raises(LoraMakerError, match="dataset changed"):
        train(dataset, host, settings(), tmp_path / "lora", resume=True)


def test_settings_that_cannot_train_this_model_are_refused(dataset, checkpoints, tmp_path):
    with pytest.raises(LoraMakerError, match="nothing would"):
        train(dataset, load_checkpoint(checkpoints[SDXL]), settings(unet_lr=0, text_encoder_lr=0), tmp_path / "lora")
    half = load_checkpoint(checkpoints[SD1], dtype=torch.float16)
    with pytest.raises(LoraMakerError, match="full precision"):
        train(dataset, half, settings(mixed_precision="no"), tmp_path / "lora")


def test_a_noobai_v_pred_key_makes_an_sdxl_checkpoint_v_and_prediction_overrides(dataset, tmp_path):
    """NoobAI V-Pred says what it is with an empty `v_pred` tensor (ComfyUI and Forge read it; the WebUI only
    reads a yaml): it is trained (and zero-terminal-SNR'd) as v; `prediction` decides by hand."""
    import safetensors.torch

    from lora_trainer_ext.hosts.checkpoint import marks_v_prediction

    path = make_checkpoint(tmp_path / "m", SDXL)  # its yaml says eps, as the WebUI's default SDXL config does
    assert load_checkpoint(path).parameterization == "eps" and not marks_v_prediction(path)
    state = safetensors.torch.load_file(path)
    safetensors.torch.save_file({**state, "v_pred": torch.tensor([])}, path)
    assert marks_v_prediction(path) and not marks_v_prediction(tmp_path / "gone.safetensors")
    host = load_checkpoint(path)
    assert host.parameterization == "v"

    meta = lora_file.read_lora(train(dataset, host, settings(epochs=1), tmp_path / "v").final)[1]
    assert (meta["modelspec.prediction_type"], meta["ss_zero_terminal_snr"]) == ("v", "True")
    by_hand = lora_file.read_lora(train(dataset, host, settings(epochs=1, prediction="eps"), tmp_path / "eps").final)[1]
    assert (by_hand["modelspec.prediction_type"], by_hand["ss_zero_terminal_snr"]) == ("epsilon", "False")
