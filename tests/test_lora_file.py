"""The LoRA file: names, tensors, hashes, metadata and card, checked against the real consumers
(diffusers, and the WebUI's and ComfyUI's key matching re-implemented in lora_consumers.py)."""

from __future__ import annotations

import copy
import hashlib
import json
import re

import pytest
import safetensors.torch
import torch
from lora_consumers import (
    TE_CONTAINERS,
    TE_LAYERS,
    UNET_LOCON_CONTAINERS,
    UNET_LORA_CONTAINERS,
    comfy_key_map,
    delta_weight,
    diffusers_forward,
    diffusers_unet,
    import_diffusers,
    ldm_forward,
    lora_targets,
    modules_of,
    network_lora,
    tiny_clip,
    tiny_ldm_unet,
    webui_key_map,
    webui_layer_table,
    webui_text_modules,
)

from lora_trainer_ext.errors import LoraMakerError
from lora_trainer_ext.hosts.host import SD1, SD2, SDXL
from lora_trainer_ext.training.lora_file import (
    UNET_PREFIX,
    NetworkInfo,
    card_path,
    from_output_names,
    ldm_to_diffusers_path,
    lora_metadata,
    lora_name,
    model_file_hash,
    output_name_map,
    read_lora,
    save_lora,
    to_output_names,
    write_card,
)

RUN = {
    "output_name": "demo",
    "session_id": 1234,
    "training_started_at": 1700000000.5,
    "training_finished_at": 1700003600.0,
    "sd_model_name": "model.safetensors",
    "sd_model_hash": "0123abcd",
    "num_epochs": 10,
    "epoch": 4,
    "steps": 400,
    "learning_rate": 1e-4,
    "unet_lr": 1e-4,
    "text_encoder_lr": 5e-5,
    "clip_skip": 2,
    "seed": 42,
    "resolution": 512,
    "keep_tokens": 1,
    "flip_aug": False,
    "noise_offset": None,
    "tag_frequency": {"1_demo": {"demo": 20, "1girl": 18}},
    "dataset_dirs": {"1_demo": {"n_repeats": 10, "img_count": 20}},
    "bucket_info": {"buckets": {"0": {"resolution": [512, 512], "count": 20}}, "mean_img_ar_error": 0.0},
    "trigger_phrase": ["demo"],
}


def models(kind):
    unet = tiny_ldm_unet(kind)
    return unet, [tiny_clip()] if kind != SDXL else [tiny_clip(), tiny_clip(projection=True)]


def saved(tmp_path, kind, locon, name="demo", **run):
    """A LoRA for a fresh tiny model of `kind`, saved the way the trainer saves it."""
    unet, tes = models(kind)
    state, paths = network_lora(kind, unet, tes, locon)
    info = NetworkInfo(dim=4, alpha=2.0, conv_dim=2 if locon else None, conv_alpha=1.0 if locon else None)
    path = tmp_path / f"{name}.safetensors"
    meta = save_lora(path, to_output_names(state, kind, paths), lora_metadata(kind, "eps", info, {**RUN, **run}))
    return path, meta, unet, tes, state, paths


def addnet_hash(path) -> str:
    """The WebUI's `hashes.addnet_hash_safetensors` of a file: sha256 after the 8-byte length and header."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        f.seek(8 + n)
        return hashlib.sha256(f.read()).hexdigest()


# --- names -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", [SD1, SD2])
def test_name_map_agrees_with_diffusers_checkpoint_converter(kind):
    """Every Linear/Conv2d of the ldm UNet lands where diffusers' own ldm->diffusers checkpoint
    converter puts its weight (an independent implementation of the §1.6 table)."""
    import_diffusers()
    from diffusers.pipelines.stable_diffusion.convert_from_ckpt import convert_ldm_unet_checkpoint

    unet = tiny_ldm_unet(kind)
    converted = convert_ldm_unet_checkpoint(
        {f"model.diffusion_model.{k}": v for k, v in unet.state_dict().items()}, diffusers_unet(kind).config
    )
    by_storage = {v.data_ptr(): k for k, v in converted.items() if k.endswith(".weight")}
    layers = [n for n, m in unet.named_modules() if type(m).__name__ in ("Linear", "Conv2d")]
    assert len(layers) > 100
    for path in layers:
        expected = by_storage[unet.get_submodule(path).weight.data_ptr()]
        assert f"{ldm_to_diffusers_path(path)}.weight" == expected, path


@pytest.mark.parametrize(
    "path",
    [
        "input_blocks.1.0.in_layers.0",  # GroupNorm: not a LoRA layer
        "input_blocks.3.0.in_layers.2",  # the downsampler block has no resnet
        "input_blocks.1.1.norm",
        "input_blocks.1.1.transformer_blocks.0.attn1.to_out.1",  # Dropout
        "output_blocks.1.1.conv",  # only a level's last block holds the upsampler
        "middle_block.1.in_layers.2",
        "label_emb.0.0",
        "out.0",
        "input_blocks.0.0.op",
        "something.else",
    ],
)
def test_unknown_unet_path_is_an_error(path):
    with pytest.raises(LoraMakerError, match="UNet path"):
        ldm_to_diffusers_path(path)
    for kind in (SD1, SDXL):  # SDXL names are kept but must still be real layers
        with pytest.raises(LoraMakerError):
            to_output_names({f"{lora_name('lora_unet', path)}.alpha": torch.tensor(1.0)}, kind, {lora_name("lora_unet", path): path})


def test_bad_module_names_are_errors():
    te = "text_model.encoder.layers.0.self_attn.q_proj"
    with pytest.raises(LoraMakerError, match="text-encoder path"):
        output_name_map(SD1, {lora_name("lora_te", "text_model.embeddings.token_embedding"): "text_model.embeddings.token_embedding"})
    with pytest.raises(LoraMakerError, match="prefix"):
        output_name_map(SD1, {lora_name("lora_te1", te): te})  # SD1 has a single text encoder
    with pytest.raises(LoraMakerError, match="prefix"):
        output_name_map(SDXL, {lora_name("lora_te", te): te})
    with pytest.raises(LoraMakerError, match="does not name"):
        output_name_map(SD1, {"lora_unet_input_blocks_1_1_proj_in": "input_blocks.1.1.proj_out"})
    with pytest.raises(LoraMakerError, match="not in module_paths"):
        to_output_names({"lora_unet_input_blocks_1_1_proj_in.alpha": torch.tensor(1.0)}, SD1, {})
    with pytest.raises(LoraMakerError, match="kind"):
        output_name_map("sd3", {})


def test_names_written_per_kind():
    names = output_name_map(
        SD1,
        {
            "lora_unet_input_blocks_1_1_transformer_blocks_0_ff_net_0_proj": "input_blocks.1.1.transformer_blocks.0.ff.net.0.proj",
            "lora_unet_output_blocks_2_1_conv": "output_blocks.2.1.conv",
            "lora_unet_input_blocks_4_0_skip_connection": "input_blocks.4.0.skip_connection",
            "lora_te_text_model_encoder_layers_0_mlp_fc1": "text_model.encoder.layers.0.mlp.fc1",
        },
    )
    assert names == {
        "lora_unet_input_blocks_1_1_transformer_blocks_0_ff_net_0_proj": "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_0_proj",
        "lora_unet_output_blocks_2_1_conv": "lora_unet_up_blocks_0_upsamplers_0_conv",
        "lora_unet_input_blocks_4_0_skip_connection": "lora_unet_down_blocks_1_resnets_0_conv_shortcut",
        "lora_te_text_model_encoder_layers_0_mlp_fc1": "lora_te_text_model_encoder_layers_0_mlp_fc1",
    }
    sdxl = {"lora_unet_output_blocks_2_2_conv": "output_blocks.2.2.conv", "lora_te2_text_model_encoder_layers_1_self_attn_out_proj": "text_model.encoder.layers.1.self_attn.out_proj"}
    assert output_name_map(SDXL, sdxl) == {k: k for k in sdxl}


@pytest.mark.parametrize("kind", [SD1, SDXL])
def test_from_output_names_inverts(tmp_path, kind):
    path, _, _, _, state, paths = saved(tmp_path, kind, locon=True)
    tensors, _ = read_lora(path)
    back = from_output_names(tensors, kind, paths)
    assert set(back) == set(state)
    for key, tensor in back.items():
        assert torch.equal(tensor, state[key].half()), key
    fewer = dict(list(paths.items())[1:])
    with pytest.raises(LoraMakerError, match="not in this network"):
        from_output_names(tensors, kind, fewer)


# --- the file --------------------------------------------------------------------------------------


def test_saved_file_holds_fp16_lora_tensors_and_the_hashes(tmp_path):
    path, meta, _, _, state, _ = saved(tmp_path, SD1, locon=True)
    tensors, header = read_lora(path)
    assert header == meta
    assert len(tensors) == len(state)
    for key, tensor in tensors.items():
        assert key.partition(".")[2] in ("lora_down.weight", "lora_up.weight", "alpha")
        assert tensor.dtype == torch.float16 and tensor.is_contiguous()
        if key.endswith(".alpha"):
            assert tensor.shape == () and float(tensor) in (2.0, 1.0)

    # The WebUI trusts sshs_model_hash as the file's hash: it must equal its addnet hash of the file.
    assert meta["sshs_model_hash"] == addnet_hash(path)
    # Different metadata, same tensors: same model hash (it covers the tensor data only).
    other = save_lora(tmp_path / "other.safetensors", tensors, {"ss_output_name": "x" * 500})
    assert other["sshs_model_hash"] == meta["sshs_model_hash"] == addnet_hash(tmp_path / "other.safetensors")


def test_legacy_hash_is_sd_scripts(tmp_path):
    """sd-scripts' sshs_legacy_hash: the 64 KiB at 1 MiB of the serialisation holding only the ss_*
    keys (so it differs from the same window of the final file, whose header is longer)."""
    g = torch.Generator().manual_seed(0)
    state = {}
    for i in range(8):  # about 2.6 MB in fp16: past the 1 MiB offset
        name = f"lora_unet_input_blocks_4_1_transformer_blocks_{i}_attn1_to_q"
        state[f"{name}.lora_down.weight"] = torch.randn(64, 1280, generator=g)
        state[f"{name}.lora_up.weight"] = torch.randn(1280, 64, generator=g)
        state[f"{name}.alpha"] = torch.tensor(32.0)
    path = tmp_path / "big.safetensors"
    meta = save_lora(path, state, {"ss_output_name": "big", "modelspec.title": "big " * 100})
    tensors, _ = read_lora(path)
    ss_only = safetensors.torch.save(tensors, {"ss_output_name": "big"})
    assert meta["sshs_legacy_hash"] == hashlib.sha256(ss_only[0x100000:0x110000]).hexdigest()[:8]
    assert meta["sshs_legacy_hash"] != hashlib.sha256(path.read_bytes()[0x100000:0x110000]).hexdigest()[:8]
    assert meta["sshs_model_hash"] == addnet_hash(path)


def test_model_file_hash_reads_the_1_mib_window(tmp_path):
    data = torch.randint(0, 256, (0x130000,), generator=torch.Generator().manual_seed(3), dtype=torch.uint8).numpy().tobytes()
    (tmp_path / "model.safetensors").write_bytes(data)
    assert model_file_hash(tmp_path / "model.safetensors") == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    (tmp_path / "small.ckpt").write_bytes(data[:1000])  # a short file hashes an empty read, as the WebUI does
    assert model_file_hash(tmp_path / "small.ckpt") == hashlib.sha256(b"").hexdigest()[:8]


def test_save_dtype_and_atomic_overwrite(tmp_path):
    path, _, _, _, state, paths = saved(tmp_path, SD1, locon=False)
    first = path.read_bytes()
    save_lora(path, to_output_names(state, SD1, paths), {"ss_output_name": "demo"}, dtype=torch.bfloat16)
    tensors, meta = read_lora(path)
    assert path.read_bytes() != first and {t.dtype for t in tensors.values()} == {torch.bfloat16}
    assert meta["ss_output_name"] == "demo"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo.safetensors"]  # no temporary left


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda sd: sd.update({"lora_unet_x.lora_mid.weight": torch.zeros(1)}), "not one of"),
        (lambda sd: sd.update({"lora_unet_x.dora_scale": torch.zeros(1)}), "not one of"),
        (lambda sd: sd.pop(next(k for k in sd if k.endswith(".alpha"))), "lacks alpha"),
        (lambda sd: sd.update({k: v[:1] for k, v in list(sd.items())[:3] if k.endswith("lora_down.weight")}), "inconsistent"),
        (lambda sd: sd.update({k: v * float("nan") for k, v in list(sd.items())[:3] if k.endswith("lora_up.weight")}), "NaN"),
        (lambda sd: sd.clear(), "no modules"),
    ],
)
def test_bad_state_dicts_are_refused_without_a_file(tmp_path, change, message):
    unet, tes = models(SD1)
    state, paths = network_lora(SD1, unet, tes, locon=False)
    out = to_output_names(state, SD1, paths)
    change(out)
    path = tmp_path / "bad.safetensors"
    with pytest.raises(LoraMakerError, match=message):
        save_lora(path, out, {"ss_output_name": "bad"})
    assert list(tmp_path.iterdir()) == []


def test_metadata_must_be_strings(tmp_path):
    unet, tes = models(SD1)
    state, paths = network_lora(SD1, unet, tes, locon=False)
    with pytest.raises(LoraMakerError, match="string"):
        save_lora(tmp_path / "x.safetensors", to_output_names(state, SD1, paths), {"ss_steps": 4})
    assert list(tmp_path.iterdir()) == []


def test_read_lora_reports_bad_files(tmp_path):
    with pytest.raises(LoraMakerError, match="not found"):
        read_lora(tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"<html>not a model</html>")
    with pytest.raises(LoraMakerError, match="damaged"):
        read_lora(bad)


# --- metadata --------------------------------------------------------------------------------------


def webui_detect_version(meta: dict) -> str:
    """`network.NetworkOnDisk.detect_version` of the WebUI's Lora extension."""
    if str(meta.get("ss_base_model_version", "")).startswith("sdxl_"):
        return "SDXL"
    if str(meta.get("ss_v2", "")) == "True":
        return "SD2"
    return "SD1" if meta else "Unknown"


@pytest.mark.parametrize(
    "kind, parameterization, locon, version, architecture, implementation",
    [
        (SD1, "eps", False, "sd_v1", "stable-diffusion-v1/lora", "diffusers"),
        (SD1, "v", True, "sd_v1_v", "stable-diffusion-v1/lora", "diffusers"),
        (SD2, "eps", False, "sd_v2", "stable-diffusion-v2-512/lora", "diffusers"),
        (SD2, "v", True, "sd_v2_v", "stable-diffusion-v2-768-v/lora", "diffusers"),
        (SDXL, "eps", True, "sdxl_base_v1-0", "stable-diffusion-xl-v1-base/lora", "https://github.com/Stability-AI/generative-models"),  # a metadata value, never fetched
    ],
)
def test_metadata(kind, parameterization, locon, version, architecture, implementation):
    info = NetworkInfo(dim=16, alpha=8, conv_dim=8 if locon else None, conv_alpha=4 if locon else None)
    meta = lora_metadata(kind, parameterization, info, RUN)
    assert all(isinstance(v, str) for v in meta.values())
    assert meta["ss_network_module"] == "networks.lora"
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("16", "8.0")
    if locon:
        assert json.loads(meta["ss_network_args"]) == {"conv_dim": "8", "conv_alpha": "4.0"}
    else:
        assert "ss_network_args" not in meta
    assert meta["ss_base_model_version"] == version
    assert meta["ss_v2"] == str(kind == SD2)
    assert webui_detect_version(meta) == {SD1: "SD1", SD2: "SD2", SDXL: "SDXL"}[kind]
    assert meta["ss_resolution"] == "(512, 512)"
    assert (meta["ss_epoch"], meta["ss_steps"], meta["ss_learning_rate"], meta["ss_flip_aug"]) == ("4", "400", "0.0001", "False")
    assert "ss_noise_offset" not in meta  # None: left out
    assert json.loads(meta["ss_tag_frequency"]) == RUN["tag_frequency"]
    assert json.loads(meta["ss_dataset_dirs"])["1_demo"]["img_count"] == 20
    assert json.loads(meta["ss_bucket_info"])["buckets"]["0"]["resolution"] == [512, 512]
    assert float(meta["ss_training_started_at"]) == RUN["training_started_at"]
    assert meta["modelspec.sai_model_spec"] == "1.0.1"
    assert meta["modelspec.architecture"] == architecture
    assert meta["modelspec.implementation"] == implementation
    assert meta["modelspec.prediction_type"] == ("v" if parameterization == "v" else "epsilon")
    assert (meta["modelspec.title"], meta["modelspec.resolution"]) == ("demo", "512x512")
    assert meta.get("modelspec.encoder_layer") == (None if kind == SDXL else "2")  # no clip skip applies to SDXL
    assert meta["modelspec.implementation_version"].startswith("lora-maker/")
    assert meta["modelspec.trigger_phrase"] == "demo"
    assert meta["modelspec.date"].startswith("2023-11-1")


def test_metadata_rejects_unknown_facts():
    with pytest.raises(LoraMakerError, match="learning_rte"):
        lora_metadata(SD1, "eps", NetworkInfo(4, 1), {"learning_rte": 1})
    with pytest.raises(LoraMakerError, match="parameterization"):
        lora_metadata(SD1, "x0", NetworkInfo(4, 1), {})


# --- the WebUI card --------------------------------------------------------------------------------


def test_card(tmp_path):
    lora = tmp_path / "demo-000004.safetensors"
    path = write_card(lora, "demo, 1girl", 0.8, SDXL)
    assert path == card_path(lora) == tmp_path / "demo-000004.json"
    card = json.loads(path.read_text(encoding="utf-8"))
    assert card == {"activation text": "demo, 1girl", "preferred weight": 0.8, "sd version": "SDXL", "notes": "", "description": ""}

    # What the user set in the WebUI's card editor survives a rewrite.
    card.update({"negative text": "blurry", "notes": "mine", "description": "my lora"})
    path.write_text(json.dumps(card), encoding="utf-8")
    write_card(lora, "demo", 1.0, SD1)
    card = json.loads(path.read_text(encoding="utf-8"))
    assert card == {"activation text": "demo", "preferred weight": 1.0, "sd version": "SD1", "notes": "mine", "description": "my lora", "negative text": "blurry"}
    write_card(lora, "demo", 1.0, SD2, notes="trained on 20 images")
    assert json.loads(path.read_text(encoding="utf-8"))["notes"] == "trained on 20 images"

    path.write_text("{broken", encoding="utf-8")  # a damaged card is replaced
    write_card(lora, "demo", 0, SD1)
    assert json.loads(path.read_text(encoding="utf-8"))["sd version"] == "SD1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo-000004.json"]
    with pytest.raises(LoraMakerError):
        write_card(lora, "demo", 1.0, "SDXL")


# --- consumers: diffusers --------------------------------------------------------------------------


def merged(unet, tensors, kind, paths, prefix="lora_unet"):
    """A copy of `unet` (ldm names) with the file's modules under `prefix` merged into its weights."""
    unet = copy.deepcopy(unet)
    with torch.no_grad():
        for name, p in modules_of(from_output_names(tensors, kind, paths)).items():
            if name.startswith(prefix + "_"):
                layer = unet.get_submodule(paths[name])
                layer.weight += delta_weight(p["lora_down.weight"], p["lora_up.weight"], p["alpha"]).reshape(layer.weight.shape)
    return unet


def lora_layers(module) -> int:
    return sum(1 for m in module.modules() if getattr(m, "lora_layer", None) is not None or getattr(m, "lora_linear_layer", None) is not None)


@pytest.mark.parametrize("kind", [SD1, SD2])
@pytest.mark.parametrize("locon", [False, True])
def test_diffusers_loads_the_file_like_the_merged_ldm_model(tmp_path, kind, locon):
    """diffusers (its kohya converter and legacy, peft-free LoRA layers) loads every module of the file
    onto the layer the network trained: its output equals the ldm UNet's with the LoRA merged."""
    import_diffusers()
    from diffusers.loaders import LoraLoaderMixin
    from diffusers.pipelines.stable_diffusion.convert_from_ckpt import convert_ldm_unet_checkpoint

    path, _, unet, tes, _, paths = saved(tmp_path, kind, locon)
    tensors, _ = read_lora(path)
    file_modules = modules_of(tensors)
    dunet = diffusers_unet(kind)
    dunet.load_state_dict(convert_ldm_unet_checkpoint({f"model.diffusion_model.{k}": v for k, v in unet.state_dict().items()}, dunet.config))
    before = diffusers_forward(dunet, kind)
    assert torch.allclose(before, ldm_forward(unet), atol=1e-4)

    state, alphas = LoraLoaderMixin.lora_state_dict(str(path))
    LoraLoaderMixin.load_lora_into_unet(state, alphas, dunet, low_cpu_mem_usage=False)
    assert lora_layers(dunet) == sum(n.startswith("lora_unet_") for n in file_modules) == (277 if locon else 192)
    after = diffusers_forward(dunet.float(), kind)
    assert (after - before).abs().max() > 0.1
    assert torch.allclose(after, ldm_forward(merged(unet, tensors, kind, paths)), atol=1e-4)

    te = tes[0]
    ids = torch.tensor([[0, 5, 7, 9, 1]])
    expected = merged(te, tensors, kind, paths, "lora_te")(ids).last_hidden_state
    LoraLoaderMixin.load_lora_into_text_encoder(state, alphas, te, low_cpu_mem_usage=False)
    assert lora_layers(te) == sum(n.startswith("lora_te_") for n in file_modules) == 12
    assert torch.allclose(te(ids).last_hidden_state, expected, atol=1e-4)


@pytest.mark.parametrize("locon", [False, True])
def test_diffusers_loads_sdxl_files(tmp_path, locon):
    """SDXL keeps sgm names; diffusers' SDXL loader renumbers them with the UNet's config."""
    import_diffusers()
    from diffusers.loaders import StableDiffusionXLLoraLoaderMixin as Mixin

    path, _, unet, tes, _, paths = saved(tmp_path, SDXL, locon)
    tensors, _ = read_lora(path)
    file_modules = modules_of(tensors)
    dunet = diffusers_unet(SDXL)
    before = diffusers_forward(dunet, SDXL)
    state, alphas = Mixin.lora_state_dict(str(path), unet_config=dunet.config)
    Mixin.load_lora_into_unet(state, alphas, dunet, low_cpu_mem_usage=False)
    assert lora_layers(dunet) == sum(n.startswith("lora_unet_") for n in file_modules) == (307 if locon else 242)
    assert (diffusers_forward(dunet.float(), SDXL) - before).abs().max() > 0.1

    ids = torch.tensor([[0, 5, 7, 9, 1]])
    for te, prefix, diffusers_prefix in zip(tes, ("lora_te1", "lora_te2"), ("text_encoder", "text_encoder_2")):
        expected = merged(te, tensors, SDXL, paths, prefix)(ids).last_hidden_state
        Mixin.load_lora_into_text_encoder(state, alphas, te, prefix=diffusers_prefix, low_cpu_mem_usage=False)
        assert lora_layers(te) == sum(n.startswith(prefix + "_") for n in file_modules) == 12
        assert torch.allclose(te(ids).last_hidden_state, expected, atol=1e-4)


# --- consumers: the WebUI and ComfyUI --------------------------------------------------------------


@pytest.mark.parametrize("kind, locon", [(SD1, False), (SD1, True), (SD2, True), (SDXL, False), (SDXL, True)])
def test_webui_matches_every_key_to_the_trained_layer(tmp_path, kind, locon):
    path, _, unet, tes, _, paths = saved(tmp_path, kind, locon)
    tensors, _ = read_lora(path)
    embedders = webui_text_modules(kind)
    table = webui_layer_table(unet, embedders, kind)
    matched, unmatched = webui_key_map(tensors, table)
    assert unmatched == []
    back = output_name_map(kind, paths)
    for network_name, file_name in back.items():
        layer = table[matched[file_name]]
        p = modules_of(tensors)[file_name]
        delta = delta_weight(p["lora_down.weight"], p["lora_up.weight"], p["alpha"])
        if network_name.startswith("lora_unet_"):
            assert matched[file_name] == "diffusion_model_" + paths[network_name].replace(".", "_")
            assert type(layer).__name__ in ("Linear", "Conv2d") and delta.numel() == layer.weight.numel()
        elif isinstance(layer, torch.nn.MultiheadAttention):  # OpenCLIP: q/k/v are thirds of in_proj
            assert delta.shape == (layer.embed_dim, layer.embed_dim)
        else:
            assert type(layer).__name__ in ("Linear", "NonDynamicallyQuantizableLinear") and delta.shape == layer.weight.shape
        prefix = "_".join(network_name.split("_")[:2])
        if prefix != UNET_PREFIX:  # the text-encoder layer the network trained is the one the WebUI patches
            embedder = {"lora_te": "" if kind == SD2 else "transformer_", "lora_te1": "0_transformer_", "lora_te2": "1_"}[prefix]
            path = paths[network_name] if embedder.endswith("transformer_") else openclip_layer(paths[network_name])
            assert matched[file_name] == embedder + path.replace(".", "_")


def openclip_layer(hf_path: str) -> str:
    """The OpenCLIP layer (in the WebUI's SD2/SDXL embedder) of an HF CLIP text-encoder layer."""
    layer, name = re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.(.+)", hf_path).groups()
    name = {"self_attn.q_proj": "attn", "self_attn.k_proj": "attn", "self_attn.v_proj": "attn", "self_attn.out_proj": "attn.out_proj", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}[name]
    return f"model.transformer.resblocks.{layer}.{name}"


@pytest.mark.parametrize("kind, locon", [(SD1, False), (SD1, True), (SD2, True), (SDXL, True)])
def test_comfyui_matches_every_key_to_the_trained_layer(tmp_path, kind, locon):
    path, _, unet, _, _, paths = saved(tmp_path, kind, locon)
    tensors, _ = read_lora(path)
    matched, unmatched = comfy_key_map(tensors, unet, kind)
    assert unmatched == []
    clip = {SD1: ["clip_l"], SD2: ["clip_h"], SDXL: ["clip_l", "clip_g"]}[kind]
    for network_name, file_name in output_name_map(kind, paths).items():
        if network_name.startswith("lora_unet_"):
            assert matched[file_name] == f"diffusion_model.{paths[network_name]}.weight"
        else:
            encoder = clip[1] if network_name.startswith("lora_te2_") else clip[0]
            assert matched[file_name] == f"{encoder}.transformer.{paths[network_name]}.weight"


def test_kohya_scope_counts():
    """The helper wraps what kohya wraps on these UNets: transformer layers only (LoRA) or also the
    resnet/down/upsampler layers (LoCon), and CLIP attention + MLP."""
    unet = tiny_ldm_unet(SD1)
    lora = lora_targets(unet, UNET_LORA_CONTAINERS, conv=False)
    locon = lora_targets(unet, UNET_LOCON_CONTAINERS, conv=True)
    # 16 transformers x 12 layers; + 22 resnets x 3, 13 resnets whose width changes have a 1x1
    # shortcut (1 down, all 12 up at this toy width), 3 down- and 3 upsamplers
    assert (len(lora), len(locon)) == (192, 192 + 66 + 13 + 6)
    assert "output_blocks.2.1.conv" in locon and "input_blocks.3.0.op" in locon
    assert len(lora_targets(tiny_clip(), TE_CONTAINERS, conv=False)) == 12


@pytest.mark.parametrize("kind", [SD1, SD2, SDXL])
@pytest.mark.parametrize("algo", ["lora", "locon"])
def test_the_real_network_writes_the_names_and_shapes_checked_above(kind, algo):
    """LoRA Maker's network on the same models gives exactly the kohya-scope modules the consumer
    tests load (SDXL: UNet only, as the network trains it)."""
    from types import SimpleNamespace

    from lora_trainer_ext.training.network import Network, NetworkConfig

    unet, tes = models(kind)
    tes = tes if kind != SDXL else []
    host = SimpleNamespace(kind=kind, unet=unet, text_encoders=tes, device=torch.device("cpu"), dtype=torch.float32, parameterization="eps")
    net = Network(host, NetworkConfig(algo=algo, dim=4, alpha=2.0, conv_dim=2), train_text_encoder=bool(tes))
    ours = to_output_names(net.lora_state_dict(), kind, net.module_paths())
    state, paths = network_lora(kind, unet, tes, algo == "locon")
    expected = to_output_names(state, kind, paths)
    if kind == SD2:  # kohya's SD2 text encoder stops at the penultimate layer, which SD2 reads
        expected = {k: v for k, v in expected.items() if f"_layers_{TE_LAYERS - 1}_" not in k}
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in expected.items()}
