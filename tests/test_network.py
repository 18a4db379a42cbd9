"""LoRA/LoCon modules on the real ldm UNetModel (tiny, in SD1's block structure) and a real HF CLIP
text encoder: kohya's module set and names, exact detach, training touches only the network."""

from __future__ import annotations

import types

import pytest
import torch

from lora_trainer_ext.errors import LoraMakerError
from lora_trainer_ext.hosts.host import SD1, SDXL
from lora_trainer_ext.training.network import Network, NetworkConfig

pytest.importorskip("ldm.modules.diffusionmodules.openaimodel")


def tiny_sd1_unet() -> torch.nn.Module:
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    torch.manual_seed(0)
    # SD1's structure (4 levels, attention on the first 3, 2 ResBlocks per level, 1x1 conv proj_in/out)
    # at a tiny width: the module set, and so kohya's counts, are those of the real SD1.5 UNet.
    unet = UNetModel(
        image_size=8, in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[4, 2, 1],
        num_res_blocks=2, channel_mult=[1, 2, 4, 4], num_head_channels=8, use_spatial_transformer=True,
        transformer_depth=1, context_dim=32, use_checkpoint=False, legacy=False,
    ).eval()
    for p in unet.parameters():  # ldm starts some output layers at zero: give every layer a say
        if not p.abs().sum():
            torch.nn.init.normal_(p, std=0.05)
    return unet


def tiny_clip():
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(1)
    config = CLIPTextConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=12,
                            num_attention_heads=4, max_position_embeddings=77)
    return CLIPTextModel(config).eval()


def host(kind=SD1, with_te=True):
    return types.SimpleNamespace(kind=kind, unet=tiny_sd1_unet(), text_encoders=[tiny_clip()] if with_te else [],
                                 device=torch.device("cpu"))


def run_unet(unet, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 16, 16, generator=g)  # 2x2 at the deepest level, so self-attention has a say
    context = torch.randn(2, 77, 32, generator=g)
    return unet(x, torch.tensor([10, 500]), context=context)


def names(network):
    return {lora.lora_name for part in network.parts for lora in part.lycoris.loras}


def test_lora_and_locon_cover_kohyas_module_set():
    h = host()
    lora = Network(h, NetworkConfig("lora", dim=4, alpha=2), train_text_encoder=True)
    unet_names = {n for n in names(lora) if n.startswith("lora_unet_")}
    te_names = names(lora) - unet_names
    # the counts of kohya's networks/lora.py on SD1.5: 192 UNet (16 transformers x 12), 72 TE (12 layers x 6)
    assert len(unet_names) == 192 and len(te_names) == 72
    assert "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q" in unet_names
    assert "lora_unet_input_blocks_1_1_proj_in" in unet_names and "lora_unet_middle_block_1_proj_out" in unet_names
    assert "lora_unet_output_blocks_11_1_transformer_blocks_0_ff_net_0_proj" in unet_names
    assert "lora_te_text_model_encoder_layers_11_mlp_fc2" in te_names
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj" in te_names

    locon = Network(host(with_te=False), NetworkConfig("locon", dim=4, alpha=2, conv_dim=2, conv_alpha=1))
    locon_names = names(locon)
    assert len(locon_names) == 278  # + 22 ResBlocks x 3, 14 shortcuts, 3 downsamplers, 3 upsamplers
    for expected in ["lora_unet_input_blocks_1_0_in_layers_2", "lora_unet_input_blocks_1_0_emb_layers_1",
                     "lora_unet_input_blocks_4_0_skip_connection", "lora_unet_input_blocks_3_0_op",
                     "lora_unet_output_blocks_2_1_conv", "lora_unet_output_blocks_5_2_conv"]:
        assert expected in locon_names
    ranks = {lora.lora_name: lora.lora_dim for lora in locon.unet.lycoris.loras}
    assert ranks["lora_unet_input_blocks_1_0_in_layers_2"] == 2  # 3x3 conv: conv_dim
    assert ranks["lora_unet_input_blocks_4_0_skip_connection"] == 4  # 1x1 conv: the linear rank, as kohya


def test_attach_is_a_no_op_at_start_and_detach_leaves_no_trace():
    h = host()
    before_out = run_unet(h.unet)
    before_dicts = {name: set(m.__dict__) for name, m in h.unet.named_modules()}
    network = Network(h, NetworkConfig("locon", dim=4, alpha=4, conv_dim=4, conv_alpha=4), train_text_encoder=True)
    network.attach()
    assert torch.allclose(run_unet(h.unet), before_out)  # lora_up starts at zero
    for p in network.parameters():
        torch.nn.init.normal_(p, std=0.1)
    assert not torch.allclose(run_unet(h.unet), before_out)
    network.detach()
    assert torch.equal(run_unet(h.unet), before_out)
    assert {name: set(m.__dict__) for name, m in h.unet.named_modules()} == before_dicts
    assert not any(isinstance(m, torch.nn.Module) and "lora" in type(m).__module__ for m in h.unet.modules())


def test_training_moves_only_the_network_and_tensors_export_by_path():
    h = host(with_te=False)
    h.unet.requires_grad_(False)
    frozen = {k: v.clone() for k, v in h.unet.state_dict().items()}
    network = Network(h, NetworkConfig("lora", dim=4, alpha=2))
    network.attach()
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-2)
    target = torch.zeros(2, 4, 16, 16)
    losses = []
    for _ in range(5):
        loss = torch.nn.functional.mse_loss(run_unet(h.unet), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    network.detach()
    assert losses[-1] < losses[0]
    assert all(torch.equal(frozen[k], v) for k, v in h.unet.state_dict().items())

    tensors = network.lora_state_dict()
    paths = network.module_paths()
    assert len(paths) == 192 and len(tensors) == 3 * 192
    name = "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q"
    assert paths[name] == "input_blocks.1.1.transformer_blocks.0.attn1.to_q"
    assert tensors[f"{name}.lora_down.weight"].shape == (4, 32) and tensors[f"{name}.lora_up.weight"].shape == (32, 4)
    assert float(tensors[f"{name}.alpha"]) == 2.0 and tensors[f"{name}.lora_up.weight"].abs().sum() > 0


def test_resume_state_round_trip_and_mismatch():
    h = host(with_te=False)
    a = Network(h, NetworkConfig("lora", dim=4, alpha=2))
    for p in a.parameters():
        torch.nn.init.normal_(p)
    b = Network(h, NetworkConfig("lora", dim=4, alpha=2))
    b.load_state_dict(a.state_dict())
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    with pytest.raises(LoraMakerError, match="does not fit"):
        Network(h, NetworkConfig("lora", dim=8, alpha=2)).load_state_dict(a.state_dict())


def test_bad_requests_are_refused():
    with pytest.raises(LoraMakerError, match="unknown network"):
        Network(host(), NetworkConfig("loha"))
    with pytest.raises(LoraMakerError, match="no trainable text encoder"):
        Network(host(with_te=False), NetworkConfig(), train_text_encoder=True)
    with pytest.raises(LoraMakerError, match="no layers to train"):
        Network(types.SimpleNamespace(kind=SD1, unet=torch.nn.Linear(2, 2), text_encoders=[], device=torch.device("cpu")),
                NetworkConfig())


class _OpenClipBlock(torch.nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.ln_1, self.ln_2 = torch.nn.LayerNorm(width), torch.nn.LayerNorm(width)
        self.attn = torch.nn.MultiheadAttention(width, 4)
        self.mlp = torch.nn.Sequential()
        self.mlp.add_module("c_fc", torch.nn.Linear(width, 2 * width))
        self.mlp.add_module("gelu", torch.nn.GELU())
        self.mlp.add_module("c_proj", torch.nn.Linear(2 * width, width))


class OpenClipTower(torch.nn.Module):
    """OpenCLIP's text tower (names, torch's MultiheadAttention with fused q/k/v, the residual blocks'
    maths) at the HF CLIP's size: open_clip itself is not installed here, the WebUI has it."""

    def __init__(self, hf):
        from lora_trainer_ext.dev.random_models import hf_to_openclip

        super().__init__()
        config = hf.config
        self.token_embedding = torch.nn.Embedding(config.vocab_size, config.hidden_size)
        self.positional_embedding = torch.nn.Parameter(torch.zeros(config.max_position_embeddings, config.hidden_size))
        self.transformer = torch.nn.Module()
        self.transformer.resblocks = torch.nn.ModuleList(
            _OpenClipBlock(config.hidden_size) for _ in range(config.num_hidden_layers))
        self.ln_final = torch.nn.LayerNorm(config.hidden_size)
        state = {k: v for k, v in hf_to_openclip(hf.state_dict()).items() if k != "logit_scale"}
        self.load_state_dict(state)

    def forward(self, ids):
        length = ids.shape[1]
        mask = torch.full((length, length), float("-inf")).triu(1)
        x = (self.token_embedding(ids) + self.positional_embedding[:length]).permute(1, 0, 2)
        for block in self.transformer.resblocks:
            x = x + block.attn(block.ln_1(x), block.ln_1(x), block.ln_1(x), need_weights=False, attn_mask=mask)[0]
            x = x + block.mlp(block.ln_2(x))
        return self.ln_final(x.permute(1, 0, 2))


def test_an_openclip_tower_trains_under_kohyas_names_what_hf_clip_computes():
    """The same LoRA tensors, under the same kohya names, on HF CLIP (lycoris) and on OpenCLIP's fused
    attention (parametrized thirds of in_proj_weight): the same outputs; detached, OpenCLIP is untouched."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from lora_trainer_ext.training.network import TEXT_ENCODER_TARGETS, _Part

    torch.manual_seed(3)
    hf = CLIPTextModel(CLIPTextConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, max_position_embeddings=16, hidden_act="gelu")).eval()
    tower = OpenClipTower(hf).eval()
    ids = torch.tensor([[1, 5, 7, 9, 11, 2]])
    with torch.no_grad():
        torch.testing.assert_close(tower(ids), hf(ids).last_hidden_state)  # the same model, two layouts
    before = {k: v.clone() for k, v in tower.state_dict().items()}
    config = NetworkConfig("lora", 4, 2.0)
    on_hf, on_tower = _Part("lora_te2", hf, TEXT_ENCODER_TARGETS, config, False), _Part("lora_te2", tower, [], config, False)
    assert on_tower.paths == on_hf.paths  # kohya's names and HF paths for every q, k, v, out, fc1, fc2
    generator = torch.Generator().manual_seed(4)
    hf_modules = {lora.lora_name: lora for lora in on_hf.lycoris.loras}
    with torch.no_grad():
        for pair in on_tower.lycoris.loras:
            theirs = hf_modules[pair.lora_name]
            for key in ("lora_down.weight", "lora_up.weight"):
                pair.get_parameter(key).copy_(torch.randn(theirs.get_parameter(key).shape, generator=generator) * 0.3)
                theirs.get_parameter(key).copy_(pair.get_parameter(key))
    with torch.no_grad():
        plain = tower(ids)
    for part in (on_hf, on_tower):
        part.attach()
    try:
        mine = tower(ids)
        torch.testing.assert_close(mine, hf(ids).last_hidden_state, atol=1e-5, rtol=1e-5)
        assert (mine - plain).abs().max() > 0.05
        mine.sum().backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in on_tower.lycoris.parameters())
    finally:
        for part in (on_tower, on_hf):
            part.detach()
    assert type(tower.transformer.resblocks[0].attn) is torch.nn.MultiheadAttention  # no parametrized class left
    assert tower.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in tower.state_dict().items())



def test_sd2_leaves_the_unused_last_openclip_layer_out_and_sdxl_keeps_it(tmp_path):
    """SD2 conditions on OpenCLIP's penultimate layer: a LoRA on the last would never learn, and kohya's SD2
    text encoder has no such layer (its keys would be unexpected there). SDXL's pooled output needs it."""
    from tiny_hosts import make_checkpoint

    from lora_trainer_ext.hosts.host import SD2
    from lora_trainer_ext.hosts.standalone import load_checkpoint

    def te_layers(kind, prefix):
        host = load_checkpoint(make_checkpoint(tmp_path / kind, kind))
        network = Network(host, NetworkConfig("lora", 4, 4.0), train_text_encoder=True)
        names = [name for part in network.text_encoder_parts for name in part.paths if name.startswith(prefix)]
        return sorted({int(name.split("_layers_")[1].split("_")[0]) for name in names})

    assert te_layers(SD2, "lora_te_") == [0]  # of the tiny tower's 2
    assert te_layers(SDXL, "lora_te2_") == [0, 1]
    assert te_layers(SDXL, "lora_te1_") == [0, 1]
