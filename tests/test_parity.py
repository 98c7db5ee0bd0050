"""Numerical parity on tiny configs (CPU, fp32, random weights): our UNet / VAE / text encoder,
loaded by load_model from both file layouts, against diffusers' UNet2DConditionModel and
AutoencoderKL and transformers' CLIPTextModel holding the same weights.
Tolerance: max |ours - ref| <= 1e-4 * max |ref|.
References: single file -> diffusers' own convert_ldm_*_checkpoint with an explicit config
(from_single_file would fetch configs from the hub); diffusers folder -> from_pretrained."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import load_file

from ti_fast import load_model
from ti_fast.loading import TINY_UNET, TINY_CLIP
from ti_fast.loading.tiny import tiny_models, write_single
from ti_fast.models import set_attention_backend

diffusers = pytest.importorskip("diffusers")
from diffusers import UNet2DConditionModel, AutoencoderKL  # noqa: E402
from diffusers.loaders.single_file_utils import (  # noqa: E402
    convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint, convert_ldm_clip_checkpoint)
from transformers import CLIPTextConfig, CLIPTextModel  # noqa: E402

TOL = 1e-4
# Written out by hand (not from ti_fast.loading.configs) so a wrong translation cannot hide.
UNET_CFG = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=2,
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                cross_attention_dim=32, attention_head_dim=2, norm_num_groups=8)
VAE_CFG = dict(in_channels=3, out_channels=3, block_out_channels=(16, 16, 32, 32), layers_per_block=2,
               down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
               latent_channels=4, norm_num_groups=8, sample_size=64)
CLIP_CFG = dict(vocab_size=TINY_CLIP.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5)


def close(ours: torch.Tensor, ref: torch.Tensor, tol: float = TOL, what: str = ""):
    assert ours.shape == ref.shape, (what, ours.shape, ref.shape)
    err = (ours.float() - ref.float()).abs().max().item()
    scale = ref.float().abs().max().item()
    assert err <= tol * scale, f"{what}: max abs err {err:.3g} > {tol:g} x max|ref| {scale:.3g}"


def load_clip_reference(sd: dict) -> CLIPTextModel:
    """transformers' CLIPTextModel from `text_model.*` keys, whatever its own nesting."""
    te = CLIPTextModel(CLIPTextConfig(**CLIP_CFG)).eval()
    own = te.state_dict().keys()
    if not any(k.startswith("text_model.") for k in own):          # transformers >= 5.6: flat
        sd = {k.removeprefix("text_model."): v for k, v in sd.items()}
    sd = {k: v for k, v in sd.items() if k in own or not k.endswith("position_ids")}
    te.load_state_dict(sd, strict=not any(k.endswith("position_ids") for k in own))
    return te


def references_from_single(file, unet_cfg=UNET_CFG):
    ckpt = load_file(str(file))
    unet = UNet2DConditionModel(**unet_cfg).eval()
    unet.load_state_dict(convert_ldm_unet_checkpoint(ckpt, unet_cfg), strict=True)
    vae = AutoencoderKL(**VAE_CFG).eval()
    vae.load_state_dict(convert_ldm_vae_checkpoint(ckpt, VAE_CFG), strict=True)
    te = load_clip_reference(convert_ldm_clip_checkpoint(ckpt))
    return unet, vae, te


def references_from_folder(d):
    unet, info = UNet2DConditionModel.from_pretrained(str(d / "unet"), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    vae = AutoencoderKL.from_pretrained(str(d / "vae"))
    te, info = CLIPTextModel.from_pretrained(str(d / "text_encoder"), output_loading_info=True)
    assert not info["missing_keys"], info
    return unet.eval(), vae.eval(), te.eval()


@pytest.fixture(scope="module", params=["single", "diffusers"])
def pair(request, tiny_single, tiny_diffusers):
    """(our SDModel, (ref unet, ref vae, ref text encoder)) for one layout."""
    if request.param == "single":
        return load_model(tiny_single), references_from_single(tiny_single / "model.safetensors")
    return load_model(tiny_diffusers), references_from_folder(tiny_diffusers)


@torch.no_grad()
def test_unet_parity_fractional_timesteps(pair):
    ours, (unet, _, _) = pair
    g = torch.Generator().manual_seed(0)
    for shape in ((2, 4, 16, 16), (1, 4, 9, 7)):                # odd latent: upsample to the skip's size
        x = torch.randn(shape, generator=g)
        t = torch.tensor([10.25, 537.75][: shape[0]])
        ctx = torch.randn(shape[0], 77, 32, generator=g)
        close(ours.unet(x, t, ctx), unet(x, t, encoder_hidden_states=ctx).sample, what=f"unet {shape}")
    close(ours.unet(x, 999, ctx), unet(x, 999, encoder_hidden_states=ctx).sample, what="unet int t")


@torch.no_grad()
def test_vae_parity(pair):
    ours, (_, vae, _) = pair
    g = torch.Generator().manual_seed(1)
    img = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
    post, ref = ours.vae.encode(img), vae.encode(img).latent_dist
    close(post.mean, ref.mean, what="vae mean"), close(post.std, ref.std, what="vae std")
    z = torch.randn(1, 4, 8, 8, generator=g)
    close(ours.vae.decode(z), vae.decode(z).sample, what="vae decode")


@torch.no_grad()
def test_text_encoder_parity_and_clip_skip(pair):
    ours, (_, _, te) = pair
    ids = ours.tokenize(["a photo of a cat", "a painting in the style of art by a dog"])
    out = te(ids, output_hidden_states=True)
    close(ours.text_encoder(ids), out.last_hidden_state, what="clip")
    final_ln = getattr(te, "text_model", te).final_layer_norm
    close(ours.text_encoder(ids, clip_skip=2), final_ln(out.hidden_states[-2]), what="clip skip 2")
    close(ours.text_encoder(ids, clip_skip=3), final_ln(out.hidden_states[-3]), what="clip skip 3")


@torch.no_grad()
def test_attention_backends_agree(tiny_single):
    m = load_model(tiny_single)
    g = torch.Generator().manual_seed(2)
    ids = m.tokenize(["a cat"])
    x, img = torch.randn(1, 4, 16, 16, generator=g), torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
    outs = {}
    for name in ("math", "sdpa"):
        for mod in (m.unet, m.vae, m.text_encoder):
            assert set_attention_backend(mod, name, verbose=False) == name
        ctx = m.text_encoder(ids)
        outs[name] = (ctx, m.unet(x, 500.5, ctx), m.vae.decode(m.vae.encode(img).mean))
    for a, b, what in zip(outs["math"], outs["sdpa"], ("clip", "unet", "vae")):
        close(a, b, tol=1e-5, what=what)


@torch.no_grad()
def test_inpainting_unet_parity(tmp_path):
    """9-channel UNet from a single file: variant detected and numerically equal."""
    ms = tiny_models(4, unet_cfg=dataclasses.replace(TINY_UNET, in_channels=9))
    f = write_single(tmp_path / "model.safetensors", *ms)
    from ti_fast.loading.tokenizer import write_tiny_tokenizer
    write_tiny_tokenizer(tmp_path / "tokenizer")
    ours = load_model(tmp_path)
    assert ours.info.variant == "sd1-inpainting"
    unet = references_from_single(f, dict(UNET_CFG, in_channels=9))[0]
    g = torch.Generator().manual_seed(3)
    x, ctx = torch.randn(2, 9, 16, 16, generator=g), torch.randn(2, 77, 32, generator=g)
    t = torch.tensor([0.5, 998.5])
    close(ours.unet(x, t, ctx), unet(x, t, encoder_hidden_states=ctx).sample, what="inpainting unet")


def test_tiny_diffusers_folder_is_a_pipeline(tiny_diffusers):
    """make_tiny's diffusers layout is what diffusers itself loads as a whole pipeline."""
    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_diffusers), safety_checker=None)
    assert type(pipe.scheduler).__name__ == "PNDMScheduler"
    assert pipe.scheduler.config.prediction_type == "epsilon"
    assert len(pipe.tokenizer) == TINY_CLIP.vocab_size and pipe.tokenizer.model_max_length == 77
    assert pipe.unet.config.in_channels == 4 and pipe.vae.config.scaling_factor == 0.18215
