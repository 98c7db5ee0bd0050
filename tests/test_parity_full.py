"""Full SD 1.5 architecture, once: a random-weight single file written in fp16 with SD 1.5's
real key names (no ti_fast_config, so load_model takes the SD 1.5 path), loaded in fp32 and
compared with diffusers/transformers holding the same weights. UNet at a 16x16 latent with
fractional timesteps, the 9-channel input by swapping conv_in on both, VAE at 128 px, text
encoder with clip skip 1 and 2. Also checks loading's peak anonymous memory.

≈ 8-9 GB of RAM and ≈ 1-2 min on 2 cores: marked slow, run serially (never in parallel workers):
    HF_HUB_OFFLINE=1 timeout 900 python -m pytest -q -m slow tests/test_parity_full.py
"""
from __future__ import annotations

import gc
import time

import pytest
import torch

from ti_fast import load_model
from ti_fast.loading import peak_rss_anon_while
from ti_fast.loading.keys import expected_shapes, UNET_PREFIX, VAE_PREFIX, CLIP_PREFIX
from ti_fast.models import UNetConfig, VAEConfig, CLIPConfig

pytestmark = pytest.mark.slow
diffusers = pytest.importorskip("diffusers")
from diffusers import UNet2DConditionModel, AutoencoderKL  # noqa: E402
from diffusers.loaders.single_file_utils import (  # noqa: E402
    convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint, convert_ldm_clip_checkpoint)
from safetensors import safe_open  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel  # noqa: E402

TOL = 1e-4
UNET15 = dict(sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280),
              layers_per_block=2, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
              up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=768,
              attention_head_dim=8, norm_num_groups=32)
VAE15 = dict(in_channels=3, out_channels=3, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
             down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
             latent_channels=4, norm_num_groups=32, sample_size=512)
CLIP15 = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
              num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5)


def close(ours, ref, what):
    err = (ours.float() - ref.float()).abs().max().item()
    scale = ref.float().abs().max().item()
    assert ours.shape == ref.shape and err <= TOL * scale, f"{what}: max abs err {err:.3g}, max|ref| {scale:.3g}"


def random_sd15_fp16(seed: int = 0) -> dict[str, torch.Tensor]:
    """Every tensor of an SD 1.5 single file, fp16: weights ~ N(0, 1/fan_in), norm scales 1 ± 0.1,
    biases ~ N(0, 0.1); plus the extra keys real files carry (position_ids, schedule, EMA counters)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for prefix, kind, cfg in ((UNET_PREFIX, "unet", UNetConfig()), (VAE_PREFIX, "vae", VAEConfig()),
                              (CLIP_PREFIX, "clip", CLIPConfig())):
        for k, shape in expected_shapes(kind, cfg).items():
            if len(shape) >= 2:
                fan_in = 1
                for s in shape[1:]:
                    fan_in *= s
                t = torch.randn(shape, generator=g) * (1.0 if "embedding" in k else fan_in ** -0.5)
            else:
                t = torch.randn(shape, generator=g) * 0.1 + (1.0 if "norm" in k and k.endswith("weight") else 0.0)
            sd[prefix + k] = t.half()
    sd[CLIP_PREFIX + "embeddings.position_ids"] = torch.arange(77)[None].float()   # float, as in some merges
    sd["betas"] = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2
    sd["model_ema.decay"], sd["model_ema.num_updates"] = torch.tensor(0.9999), torch.tensor(0, dtype=torch.int32)
    return sd


@pytest.fixture(scope="module")
def sd15_file(tmp_path_factory):
    from safetensors.torch import save_file
    f = tmp_path_factory.mktemp("sd15") / "random-sd15-fp16.safetensors"
    sd = random_sd15_fp16()
    save_file(sd, str(f))
    del sd
    gc.collect()
    return f


def _tokenizer():
    from ti_fast.loading import tokenizer as T
    if T.find_bpe_file() is not None:
        return None                                  # the normal resolution builds SD's tokenizer
    return T.load_tokenizer_dir(T.write_tiny_tokenizer(T.cache_dir() / "tiny-tokenizer"))


def _ref_state(file, keys_prefix: str) -> dict:
    """The file's tensors under one prefix, as fp32 (fp16 files are upcast, as we load ours)."""
    with safe_open(str(file), "pt") as f:
        return {k: f.get_tensor(k).float() for k in f.keys() if k.startswith(keys_prefix)}


@torch.no_grad()
def test_full_sd15_parity(sd15_file):
    t0 = time.perf_counter()
    r = peak_rss_anon_while(load_model, sd15_file, tokenizer=_tokenizer())
    load_s = time.perf_counter() - t0
    ours = r.result
    assert ours.info.variant == "sd1" and ours.info.file_dtype == "float16" and ours.unet.dtype == torch.float32
    params = [p for m in (ours.unet, ours.vae, ours.text_encoder) for p in m.parameters()]
    model_bytes = sum(p.numel() * 4 for p in params)
    largest = max(p.numel() * 4 for p in params)
    growth = r.peak - r.before
    print(f"\nload {load_s:.1f} s; RssAnon growth {growth / 2**30:.2f} GiB for a {model_bytes / 2**30:.2f} GiB model")
    assert growth <= model_bytes + largest + 0.5 * 2**30
    assert sum(p.numel() for p in ours.unet.parameters()) == 859_520_964

    # ---- UNet: 16x16 latent, fractional t, then the 9-channel input on the same pair
    with torch.device("meta"):
        ref = UNet2DConditionModel(**UNET15)
    ckpt = _ref_state(sd15_file, UNET_PREFIX)
    ref.load_state_dict(convert_ldm_unet_checkpoint(ckpt, UNET15), strict=True, assign=True)
    del ckpt
    ref.eval()
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, 768, generator=g)
    t = torch.tensor([1.5, 742.25])
    close(ours.unet(x, t, ctx), ref(x, t, encoder_hidden_states=ctx).sample, "full unet")
    conv9 = torch.nn.Conv2d(9, 320, 3, padding=1)
    ours.unet.input_blocks[0][0] = conv9
    ref.conv_in = conv9
    x9 = torch.randn(1, 9, 16, 16, generator=g)
    close(ours.unet(x9, 999.0, ctx[:1]), ref(x9, 999.0, encoder_hidden_states=ctx[:1]).sample, "full unet 9ch")
    del ref
    gc.collect()

    # ---- VAE at 128 px
    with torch.device("meta"):
        vae = AutoencoderKL(**VAE15)
    vae.load_state_dict(convert_ldm_vae_checkpoint(_ref_state(sd15_file, VAE_PREFIX), VAE15), strict=True, assign=True)
    vae.eval()
    img = torch.rand(1, 3, 128, 128, generator=g) * 2 - 1
    close(ours.vae.encode(img).mean, vae.encode(img).latent_dist.mean, "full vae encode")
    z = torch.randn(1, 4, 16, 16, generator=g)
    close(ours.vae.decode(z), vae.decode(z).sample, "full vae decode")
    del vae

    # ---- text encoder, clip skip 1 and 2
    te = CLIPTextModel(CLIPTextConfig(**CLIP15)).eval()
    sd = convert_ldm_clip_checkpoint(_ref_state(sd15_file, CLIP_PREFIX))
    own = te.state_dict().keys()
    sd = {k if k in own else k.removeprefix("text_model."): v for k, v in sd.items() if not k.endswith("position_ids")}
    te.load_state_dict(sd, strict=True)
    ids = ours.tokenize(["a photo of a cat", "a painting of a dog in the style of art"])
    out = te(ids, output_hidden_states=True)
    close(ours.text_encoder(ids), out.last_hidden_state, "full clip")
    final_ln = getattr(te, "text_model", te).final_layer_norm
    close(ours.text_encoder(ids, clip_skip=2), final_ln(out.hidden_states[-2]), "full clip skip 2")
