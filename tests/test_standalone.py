"""The standalone host: tiny SD1 / SD2-v / SDXL checkpoints in the original layout, loaded with the real
ldm and HF classes, give the conditioning, latents, predictions and schedule the trainer relies on."""

from __future__ import annotations

import hashlib
import math
import shutil

import numpy as np
import pytest
import torch
import yaml
from tiny_hosts import checkpoints_of_every_kind, hf_to_openclip, make_checkpoint

from lora_trainer_ext.errors import LoraMakerError
from lora_trainer_ext.hosts.host import SD1, SD2, SDXL, SizeInfo
from lora_trainer_ext.hosts.models import openclip_to_hf
from lora_trainer_ext.hosts.prompt import BREAK, CHUNK_LENGTH, parse_weights, split_chunks
from lora_trainer_ext.hosts.standalone import guess_v_prediction, load_checkpoint

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    return checkpoints_of_every_kind(root)


@pytest.fixture(scope="module")
def hosts(files):
    return {kind: load_checkpoint(path) for kind, path in files.items()}


def words(n: int) -> str:
    """A caption of exactly n tokens in the tiny vocabulary (each of these words is one token)."""
    return " ".join(["dog", "red", "blue", "hair"][i % 4] for i in range(n))


def padded_ids(host, caption: str) -> torch.Tensor:
    """The 77 ids of a short caption through HF's own padding (SD1 pads with EOS, as the WebUI does)."""
    return host.tokenizer.tokenizer([caption], padding="max_length", max_length=77, return_tensors="pt").input_ids


# ------------------------------------------------------------------------------------ detection


def test_kind_and_parameterization_come_from_keys_and_yaml(hosts, tmp_path):
    assert [(h.kind, h.parameterization) for h in hosts.values()] == [(SD1, "eps"), (SD2, "v"), (SDXL, "eps")]
    assert load_checkpoint(make_checkpoint(tmp_path / "a", SD2)).parameterization == "eps"
    assert load_checkpoint(make_checkpoint(tmp_path / "b", SDXL, v_prediction=True)).parameterization == "v"


def test_models_are_the_real_classes_frozen_in_eval_mode(hosts):
    from ldm.modules.diffusionmodules.openaimodel import UNetModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    for host in hosts.values():
        assert isinstance(host.unet, UNetModel)
        for module in [host.unet, host.vae, *host.text_encoders]:
            assert not module.training
            assert not any(p.requires_grad for p in module.parameters())
    assert [type(t) for t in hosts[SD2].text_encoders] == [CLIPTextModel]
    assert [type(t) for t in hosts[SDXL].text_encoders] == [CLIPTextModel, CLIPTextModelWithProjection]
    # SDXL's sgm-only parts carry sgm's names, so real SDXL weights and LoRA keys line up
    names = dict(hosts[SDXL].unet.named_modules())
    assert "label_emb.0.0" in names and "label_emb.0.2" in names
    assert "output_blocks.2.1.transformer_blocks.1.attn2.to_k" in names  # depth 2 at the lowest level


def test_swapped_in_modules_keep_ldm_class_names(hosts):
    """LyCORIS and the WebUI find layers by class name: our ldm subclasses must not rename them."""
    for host in hosts.values():
        for module in [host.unet, host.vae]:
            for m in module.modules():
                ours = [c for c in type(m).__mro__ if c.__module__ == "lora_trainer_ext.hosts.models"]
                assert not ours or type(m).__name__ == type(m).__mro__[1].__name__, type(m)
        names = [type(m).__name__ for m in host.unet.modules()]
        assert names.count("SpatialTransformer") == (11 if host.kind == SDXL else 16)  # in, out, middle


def test_standard_configs_build_the_real_architectures():
    """Without a yaml the standard configs are used: built on the meta device they have exactly the
    parameter counts of SD 1.5 / SD 2.x / SDXL base (the sgm parts of SDXL assembled from ldm's)."""
    from lora_trainer_ext.hosts.checkpoint import STANDARD_CONFIGS
    from lora_trainer_ext.hosts.models import build_unet, build_vae

    counts = {SD1: 859_520_964, SD2: 865_910_724, SDXL: 2_567_463_684}
    for kind, count in counts.items():
        params = STANDARD_CONFIGS[kind]["model"]["params"]
        with torch.device("meta"):
            unet = build_unet(params["network_config" if kind == SDXL else "unet_config"]["params"])
            vae = build_vae(params["first_stage_config"]["params"])
        assert sum(p.numel() for p in unet.parameters()) == count
        assert sum(p.numel() for p in vae.parameters()) == 83_653_863
    assert len(unet.state_dict()) == 1680  # an SDXL base checkpoint's model.diffusion_model.* keys


def test_model_name_and_webui_short_hash(hosts, files):
    host = hosts[SD1]
    assert host.model_name == files[SD1].name
    assert host.model_hash == hashlib.sha256(files[SD1].read_bytes()).hexdigest()[:10]


# ---------------------------------------------------------------------------------- conditioning


def test_sd1_conditioning_is_77_per_75_token_chunk(hosts):
    host = hosts[SD1]
    assert len(host.tokenizer.chunks([words(75)])[0][0]) == 75
    assert host.conditioning(["a photo of a cat"]).shape == (1, 77, 32)
    assert host.conditioning([words(75)]).shape == (1, 77, 32)
    assert host.conditioning([words(76), "cat"]).shape == (2, 154, 32)
    assert host.conditioning([words(200)]).shape == (1, 231, 32)


def test_sd1_short_caption_matches_the_text_model_last_layer(hosts):
    host = hosts[SD1]
    caption = "a photo of 1girl with red hair, smiling"  # "smiling" is not in the vocabulary: spelled out
    expected = host.text_encoders[0](padded_ids(host, caption)).last_hidden_state
    torch.testing.assert_close(host.conditioning([caption]), expected)


def test_clip_skip_takes_an_earlier_layer_through_the_final_norm(hosts):
    host = hosts[SD1]
    te = host.text_encoders[0]
    caption = "a photo of a cat"
    out = te(padded_ids(host, caption), output_hidden_states=True)
    try:
        host.clip_skip = 2
        skipped = host.conditioning([caption])
        with pytest.raises(LoraMakerError, match="clip skip"):
            host.clip_skip = 3  # the tiny encoder has two layers
            host.conditioning([caption])
    finally:
        host.clip_skip = 1
    torch.testing.assert_close(skipped, te.text_model.final_layer_norm(out.hidden_states[-2]))
    assert not torch.allclose(skipped, host.conditioning([caption]))


def test_sd2_uses_the_penultimate_layer_and_pads_with_zero(hosts):
    host = hosts[SD2]
    ids = padded_ids(host, "a red cat")
    ids[0, (ids[0] == host.tokenizer.eos).nonzero()[0, 0] + 1:] = 0  # OpenCLIP pads with id 0 after the EOS
    out = host.text_encoders[0](ids, output_hidden_states=True)
    expected = host.text_encoders[0].text_model.final_layer_norm(out.hidden_states[-2])
    torch.testing.assert_close(host.conditioning(["a red cat"]), expected)


def test_sdxl_conditioning_context_and_pooled_vector(hosts):
    host = hosts[SDXL]
    te1, te2 = host.text_encoders
    sizes = [SizeInfo((64, 96), (0, 16), (64, 64))]
    cond = host.conditioning(["a photo of a dog"], sizes)
    assert cond["crossattn"].shape == (1, 77, 80) and cond["vector"].shape == (1, 48 + 6 * 16)

    ids1 = padded_ids(host, "a photo of a dog")
    ids2 = ids1.clone()
    ids2[0, (ids2[0] == host.tokenizer.eos).nonzero()[0, 0] + 1:] = 0
    out1 = te1(ids1, output_hidden_states=True)
    out2 = te2(ids2, output_hidden_states=True)
    torch.testing.assert_close(cond["crossattn"], torch.cat([out1.hidden_states[1], out2.hidden_states[-2]], -1))
    torch.testing.assert_close(cond["vector"][:, :48], out2.text_embeds)  # HF pools at the EOS (the largest id)

    sinusoid = cond["vector"][0, 48:].reshape(6, 16)  # per int: cos(v * f_i) then sin(v * f_i)
    freqs = torch.exp(-math.log(10000) * torch.arange(8) / 8)
    for value, row in zip([64, 96, 0, 16, 64, 64], sinusoid):
        torch.testing.assert_close(row, torch.cat([torch.cos(value * freqs), torch.sin(value * freqs)]))

    other = host.conditioning(["a photo of a dog"], [SizeInfo((128, 96), (0, 16), (64, 64))])
    assert not torch.equal(other["vector"], cond["vector"])
    torch.testing.assert_close(other["crossattn"], cond["crossattn"])
    assert host.conditioning(["a"] * 2, None)["vector"].shape == (2, 144)
    assert host.conditioning([words(100)], sizes)["crossattn"].shape == (1, 154, 80)


def test_conditioning_carries_gradients_to_a_trained_text_encoder(hosts):
    for host in (hosts[SD1], hosts[SDXL]):
        te = host.text_encoders[-1]
        weight = te.text_model.encoder.layers[0].mlp.fc1.weight
        weight.requires_grad_(True)
        try:
            cond = host.conditioning(["a cat"], [SizeInfo((64, 64), (0, 0), (64, 64))] if host.kind == SDXL else None)
            (cond["vector"].sum() + cond["crossattn"].sum() if host.kind == SDXL else cond.sum()).backward()
            assert weight.grad is not None and weight.grad.abs().sum() > 0
        finally:
            weight.requires_grad_(False)
            weight.grad = None


def test_chunks_break_after_a_nearby_comma_like_the_webui():
    comma = 9
    ids = [1] * 70 + [comma] + [2] * 10
    assert [len(c) for c in split_chunks(ids, comma)] == [71, 10]
    assert [len(c) for c in split_chunks(ids, comma, backtrack=0)] == [75, 6]
    far = [1] * 50 + [comma] + [2] * 30  # comma 24 tokens back from the end of the chunk
    assert [len(c) for c in split_chunks(far, comma)] == [75, 6]
    assert split_chunks([], comma) == [[]]
    assert sum(split_chunks(list(range(300)), None), []) == list(range(300))
    assert max(len(c) for c in split_chunks(list(range(300)), None)) == CHUNK_LENGTH
    assert [len(c) for c in split_chunks([1, 2, BREAK, 3], comma)] == [2, 1]  # BREAK ends the chunk
    assert [len(c) for c in split_chunks([BREAK, 3], comma)] == [0, 1]  # even an empty one, as the WebUI
    assert [len(c) for c in split_chunks([1] * 75 + [BREAK, 3], comma)] == [75, 1]  # the full chunk was the one it ends


def test_emphasis_and_break_parse_like_the_webui():
    # The WebUI's own examples (prompt_parser.parse_prompt_attention's docstring).
    assert parse_weights("normal text") == [("normal text", 1.0)]
    assert parse_weights("an (important) word") == [("an ", 1.0), ("important", 1.1), (" word", 1.0)]
    assert parse_weights("(unbalanced") == [("unbalanced", 1.1)]
    assert parse_weights(r"\(literal\]") == [("(literal]", 1.0)]
    assert parse_weights("(unnecessary)(parens)") == [("unnecessaryparens", 1.1)]
    assert parse_weights("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).") == [
        ("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
        (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)]  # to the last bit: the same products
    assert parse_weights("mychar, smile BREAK hat") == [("mychar, smile", 1.0), (BREAK, -1), ("hat", 1.0)]
    assert parse_weights("(a BREAK b)")[1] == ("BREAK", -1.1)  # inside brackets it is a word, as in the WebUI
    assert parse_weights("x:1.5), BREAKfast") == [("x:1.5), BREAKfast", 1.0)]
    assert parse_weights("") == [("", 1.0)]


def test_weighted_captions_change_only_their_tokens_before_the_rescale(hosts):
    host = hosts[SD1]
    plain, weighted = host.conditioning(["mychar, smile, red hair"]), host.conditioning(["mychar, (smile:1.5), red hair"])
    assert plain.shape == weighted.shape and not torch.allclose(plain, weighted)
    torch.testing.assert_close(weighted.mean(), plain.mean())  # the WebUI's "Original" keeps the mean
    escaped = host.conditioning([r"mychar, \(smile\), red hair"])
    assert not torch.allclose(escaped, plain) and not torch.allclose(escaped, weighted)  # literal brackets
    assert host.conditioning(["mychar BREAK smile"]).shape == (1, 154, 32)
    torch.testing.assert_close(host.conditioning(["cat", "mychar, smile, red hair"])[1:], plain)  # no weights, no rescale


# ------------------------------------------------------------------------------ VAE, UNet, schedule


def test_encode_images_samples_scaled_latents(hosts):
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    for host, scale in [(hosts[SD1], 0.18215), (hosts[SDXL], 0.13025)]:
        torch.manual_seed(1)
        latents = host.encode_images(images)
        assert latents.shape == (2, 4, 8, 8) and latents.dtype == torch.float32
        torch.manual_seed(1)
        with torch.no_grad():
            expected = host.vae.encode(images).sample() * scale
        torch.testing.assert_close(latents, expected)


def test_apply_model_predicts_latent_shaped_output(hosts):
    latents = torch.randn(2, 4, 8, 8)
    t = torch.tensor([0, 999])
    for host in hosts.values():
        sizes = [SizeInfo((64, 64), (0, 0), (64, 64))] * 2 if host.kind == SDXL else None
        cond = host.conditioning(["a cat", "a dog"], sizes)
        with torch.no_grad():
            out = host.apply_model(latents, t, cond)
            assert out.shape == latents.shape and torch.isfinite(out).all()
            assert not torch.allclose(out, host.apply_model(latents, torch.tensor([500, 500]), cond))


def test_sdp_attention_gives_ldm_attention_results(files, hosts):
    for kind in (SD1, SDXL):
        plain = load_checkpoint(files[kind], attention="ldm")
        fast = hosts[kind]
        cond = plain.conditioning(["a red cat"], None)
        latents = torch.randn(1, 4, 8, 8)
        with torch.no_grad():
            torch.testing.assert_close(fast.apply_model(latents, torch.tensor([7]), cond),
                                       plain.apply_model(latents, torch.tensor([7]), cond), atol=1e-5, rtol=1e-4)
            images = torch.rand(1, 3, 64, 64)
            torch.testing.assert_close(fast.vae.encode(images).mean, plain.vae.encode(images).mean,
                                       atol=1e-5, rtol=1e-4)


def test_half_precision_host_runs_under_autocast(files):
    host = load_checkpoint(files[SDXL], dtype=torch.bfloat16)
    assert host.dtype == torch.bfloat16 and next(host.unet.parameters()).dtype == torch.bfloat16
    assert next(host.vae.parameters()).dtype == torch.float32
    cond = host.conditioning(["a cat"], [SizeInfo((64, 64), (0, 0), (64, 64))])
    with torch.no_grad():
        out = host.apply_model(host.encode_images(torch.zeros(1, 3, 64, 64)), torch.tensor([10]), cond)
    assert out.shape == (1, 4, 8, 8) and torch.isfinite(out.float()).all()


def test_alphas_cumprod_is_the_scaled_linear_schedule(hosts):
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2
    for host in hosts.values():
        a = host.alphas_cumprod
        assert a.dtype == torch.float32 and a.shape == (1000,)
        assert a[0].item() == pytest.approx(1 - 0.00085, rel=1e-6)
        assert a[-1].item() == pytest.approx(float(np.prod(1 - betas)), rel=1e-5)


def test_sd2_without_a_yaml_guesses_v_by_running_the_unet(hosts):
    unet = hosts[SD2].unet
    conv = unet.out[2]
    saved = conv.weight.detach().clone(), conv.bias.detach().clone()
    try:
        with torch.no_grad():
            conv.weight.zero_()
            conv.bias.fill_(-2.0)  # predicts -2 everywhere: far below a 0.5 input, like a v model
            assert guess_v_prediction(unet) is True
            conv.bias.fill_(0.4)  # near the input, like an eps model
            assert guess_v_prediction(unet) is False
    finally:
        with torch.no_grad():
            conv.weight.copy_(saved[0])
            conv.bias.copy_(saved[1])


# --------------------------------------------------------------------------- OpenCLIP conversion


def openclip_forward(state: dict, ids: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """OpenCLIP's text tower written out (torch's MultiheadAttention on the fused in_proj, causal mask,
    GELU MLP, ln_final, pooled = state at the EOS @ text_projection): the reference for the conversion."""
    x = state["token_embedding.weight"][ids] + state["positional_embedding"][: ids.shape[1]]
    width, n = x.shape[-1], ids.shape[1]
    mask = torch.full((n, n), float("-inf")).triu(1)
    layers = sorted({int(k.split(".")[2]) for k in state if k.startswith("transformer.resblocks.")})
    for i in layers:
        p = f"transformer.resblocks.{i}."
        attn = torch.nn.MultiheadAttention(width, heads, batch_first=True)
        attn.load_state_dict({name: state[p + "attn." + name] for name in
                              ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias")})
        h = torch.nn.functional.layer_norm(x, (width,), state[p + "ln_1.weight"], state[p + "ln_1.bias"])
        x = x + attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        h = torch.nn.functional.layer_norm(x, (width,), state[p + "ln_2.weight"], state[p + "ln_2.bias"])
        h = torch.nn.functional.gelu(h @ state[p + "mlp.c_fc.weight"].T + state[p + "mlp.c_fc.bias"])
        x = x + h @ state[p + "mlp.c_proj.weight"].T + state[p + "mlp.c_proj.bias"]
    x = torch.nn.functional.layer_norm(x, (width,), state["ln_final.weight"], state["ln_final.bias"])
    pooled = x[torch.arange(len(ids)), ids.argmax(dim=-1)] @ state["text_projection"]
    return x, pooled


def test_openclip_weights_convert_to_an_equivalent_hf_model():
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(3)
    config = CLIPTextConfig(vocab_size=100, hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                            num_attention_heads=4, max_position_embeddings=20, projection_dim=24, hidden_act="gelu")
    source = CLIPTextModelWithProjection(config).eval()
    for p in source.parameters():  # HF's init leaves biases at 0 and norms at 1: randomise all to catch swaps
        p.data.normal_(0, 0.2)
    openclip = hf_to_openclip(source.state_dict())
    assert "transformer.resblocks.2.attn.in_proj_weight" in openclip and openclip["text_projection"].shape == (48, 24)

    converted = openclip_to_hf(openclip, projection=True)
    target = CLIPTextModelWithProjection(config).eval()
    result = target.load_state_dict(converted, strict=False)
    assert set(result.missing_keys) <= {"text_model.embeddings.position_ids"} and not result.unexpected_keys

    ids = torch.tensor([[98, 5, 17, 42, 99, 0, 0, 0], [98, 7, 99, 0, 0, 0, 0, 0]])
    with torch.no_grad():
        hidden, pooled = openclip_forward(openclip, ids, heads=4)
        out = target(ids)
    torch.testing.assert_close(out.last_hidden_state, hidden, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.text_embeds, pooled, atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------------------- failures


def test_unreadable_and_foreign_files_are_clear_errors(tmp_path, files):
    from safetensors.torch import save_file

    with pytest.raises(LoraMakerError, match="not found"):
        load_checkpoint(tmp_path / "missing.safetensors")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01 this is not a model" * 10)
    with pytest.raises(LoraMakerError, match="not a readable checkpoint"):
        load_checkpoint(garbage)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(files[SD1].read_bytes()[:100_000])
    with pytest.raises(LoraMakerError, match="not a readable checkpoint"):
        load_checkpoint(truncated)
    pickle = tmp_path / "bad.ckpt"
    pickle.write_bytes(b"not a pickle")
    with pytest.raises(LoraMakerError, match="not a readable checkpoint"):
        load_checkpoint(pickle)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"encoder.weight": torch.zeros(2, 2)}, str(foreign))
    with pytest.raises(LoraMakerError, match="no Stable Diffusion UNet"):
        load_checkpoint(foreign)


def test_config_mismatches_are_clear_errors(tmp_path, files):
    from safetensors.torch import load_file, save_file

    with pytest.raises(LoraMakerError, match="SDXL config but .* SD 1.x checkpoint"):
        load_checkpoint(files[SD1], config=files[SDXL].with_suffix(".yaml"))
    with pytest.raises(LoraMakerError, match="Model config not found"):
        load_checkpoint(files[SD1], config=tmp_path / "nope.yaml")

    # no yaml: the standard SD1 config does not fit tiny weights
    alone = tmp_path / "alone" / "model.safetensors"
    alone.parent.mkdir()
    alone.write_bytes(files[SD1].read_bytes())
    shutil.copytree(files[SD1].parent / "tokenizer", alone.parent / "tokenizer")
    with pytest.raises(LoraMakerError, match="do not (fit|match) the model config"):
        load_checkpoint(alone)

    config = yaml.safe_load(files[SD1].with_suffix(".yaml").read_text())
    config["model"]["params"]["unet_config"]["params"]["in_channels"] = 9
    inpaint = tmp_path / "inpaint.yaml"
    inpaint.write_text(yaml.safe_dump(config))
    with pytest.raises(LoraMakerError, match="inpainting"):
        load_checkpoint(files[SD1], config=inpaint)

    config = yaml.safe_load(files[SD1].with_suffix(".yaml").read_text())
    config["lora_maker"]["tokenizer"] = "no-such-folder"
    notok = tmp_path / "notok.yaml"
    notok.write_text(yaml.safe_dump(config))
    with pytest.raises(LoraMakerError, match="tokenizer folder"):
        load_checkpoint(files[SD1], config=notok)

    state = load_file(str(files[SD1]))
    del state["cond_stage_model.transformer.text_model.final_layer_norm.weight"]
    broken = tmp_path / "broken.safetensors"
    save_file(state, str(broken))
    with pytest.raises(LoraMakerError, match="missing text_model.final_layer_norm.weight"):
        load_checkpoint(broken, config=files[SD1].with_suffix(".yaml"))


def test_old_transformers_text_keys_and_ckpt_files_load(tmp_path, files, hosts):
    from safetensors.torch import load_file

    state = load_file(str(files[SD1]))
    old = {k.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."): v
           for k, v in state.items()}
    ckpt = tmp_path / "old-layout.ckpt"
    torch.save({"state_dict": old, "global_step": 10}, ckpt)
    host = load_checkpoint(ckpt, config=files[SD1].with_suffix(".yaml"))
    torch.testing.assert_close(host.conditioning(["a cat"]), hosts[SD1].conditioning(["a cat"]))
