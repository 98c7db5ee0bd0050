"""What a checkpoint is: SD 1.x (or its 9-channel inpainting variant), or a one-line refusal.

Decided from names, shapes and metadata only (safetensors headers, configs, a sidecar .yaml),
before any model is built or any tensor is read. Refused: SDXL, SD 2.x, unCLIP, v-prediction
fine-tunes, instruct-pix2pix, and files that are something else (LoRA, embedding, VAE,
ControlNet, diffusers part files).
"""
from __future__ import annotations

import re
from pathlib import Path

from .errors import refuse
from .keys import UNET_PREFIX, VAE_PREFIX, CLIP_PREFIX_OLD

SDXL = "SDXL checkpoint (conditioner.embedders / label_emb): ti-fast trains SD 1.x only; use an SDXL trainer"
SD2 = "SD 2.x checkpoint ({why}): ti-fast trains SD 1.x only (SD 2.x embeddings need an OpenCLIP trainer)"
VPRED = ("v-prediction model ({why}): ti-fast trains epsilon-prediction SD 1.x only; "
         "use the epsilon base model this was tuned from")
IP2P = "instruct-pix2pix model (8 UNet input channels): not supported; use a txt2img SD 1.x model"
V_PARAM = re.compile(r"""^\s*parameterization\s*:\s*["']?v["']?\s*(#.*)?$""", re.M)


def sidecar_yaml(path: Path) -> Path | None:
    """The A1111-style config beside a checkpoint: model.safetensors -> model.yaml."""
    y = path.with_suffix(".yaml")
    return y if y.is_file() else None


def check_sidecar(path: Path) -> None:
    y = sidecar_yaml(path)
    if y is None:
        return
    text = y.read_text(encoding="utf-8", errors="replace")
    if V_PARAM.search(text):
        raise refuse(path, VPRED.format(why=f'{y.name} says parameterization: "v"'))
    if "FrozenOpenCLIPEmbedder" in text:
        raise refuse(path, SD2.format(why=f"{y.name} names an OpenCLIP text encoder"))


def _metadata_vpred(meta: dict) -> str | None:
    for k in ("modelspec.prediction_type", "prediction_type", "ss_v_parameterization", "v_pred"):
        v = str(meta.get(k, "")).strip().lower()
        if v in ("v", "v_prediction", "v-prediction", "true", "1"):
            return f"safetensors metadata {k}={meta[k]}"
    return None


def _what_else(keys: list[str]) -> str:
    """Name a file that holds no SD UNet."""
    ks = set(keys)
    if any("lora_" in k or ".lora_down." in k or ".lora_A." in k or k.startswith("lora") for k in keys):
        return "a LoRA, not a model checkpoint: load a full SD 1.x model"
    if ks & {"string_to_param", "emb_params", "clip_l", "clip_g"} or any(k.startswith("string_to_param") for k in keys):
        return "a textual-inversion embedding, not a model checkpoint"
    if any(k.startswith("control_model.") or k.startswith("input_hint_block") for k in keys):
        return "a ControlNet, not a model checkpoint"
    if "encoder.conv_in.weight" in ks and "decoder.conv_in.weight" in ks:
        return "a standalone VAE: pass it as vae= (--vae) next to a full SD 1.x model"
    if "conv_in.weight" in ks and any(k.startswith("down_blocks.") for k in keys):
        return "one part of a diffusers folder (a UNet file): load the whole folder instead"
    if any(k.startswith("text_model.") or k.startswith("encoder.layers.") for k in keys):
        return "a text encoder alone, not a model checkpoint"
    sample = ", ".join(sorted(keys)[:3]) or "no tensors"
    return f"not an SD checkpoint: no {UNET_PREFIX}* keys (found {sample})"


def unet_in_channels(shapes: dict, key: str, path: Path) -> int:
    """4 = txt2img, 9 = inpainting; 8 (instruct-pix2pix) and others are refused."""
    shp = shapes.get(key)
    cin = shp[1] if shp is not None and len(shp) == 4 else None
    if cin == 8:
        raise refuse(path, IP2P)
    if cin not in (4, 9):
        raise refuse(path, f"UNet conv_in takes {cin} channels: SD 1.x models take 4 (or 9 for inpainting)")
    return cin


def classify_single(shapes: dict[str, tuple], metadata: dict, path: Path) -> str:
    """'sd1' | 'sd1-inpainting' for a single-file checkpoint's tensor names/shapes, or refuse."""
    keys = list(shapes)
    arch = str(metadata.get("modelspec.architecture", "")).lower()
    if any(k.startswith("conditioner.embedders.") for k in keys) or "xl" in arch:
        raise refuse(path, SDXL)
    if any(k.startswith(UNET_PREFIX + "label_emb") for k in keys):
        raise refuse(path, "unCLIP / SD 2.x upscaler checkpoint (label_emb): ti-fast trains SD 1.x only")
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        raise refuse(path, SD2.format(why="OpenCLIP text encoder cond_stage_model.model.*"))
    if "v2" in arch or "stable-diffusion-2" in arch:
        raise refuse(path, SD2.format(why=f"metadata modelspec.architecture={arch}"))
    for k in keys:
        if k.startswith(UNET_PREFIX) and k.endswith("attn2.to_k.weight") and shapes[k][-1] == 1024:
            raise refuse(path, SD2.format(why="1024-wide cross-attention context"))
        if k.startswith(UNET_PREFIX) and k.endswith("proj_in.weight") and len(shapes[k]) == 2:
            raise refuse(path, SD2.format(why="linear proj_in"))
    if "v_pred" in shapes or any(k.endswith(".v_pred") for k in keys):
        raise refuse(path, VPRED.format(why="it carries a v_pred key"))
    why = _metadata_vpred(metadata)
    if why:
        raise refuse(path, VPRED.format(why=why))
    check_sidecar(path)
    if not any(k.startswith(UNET_PREFIX) for k in keys):
        raise refuse(path, _what_else(keys))
    cin = unet_in_channels(shapes, UNET_PREFIX + "input_blocks.0.0.weight", path)
    return "sd1-inpainting" if cin == 9 else "sd1"


def has_vae(keys) -> bool:
    return any(k.startswith(VAE_PREFIX) for k in keys)


def has_text_encoder(keys) -> bool:
    return any(k.startswith(CLIP_PREFIX_OLD) for k in keys)


def classify_diffusers(folder: Path, index: dict, scheduler: dict | None) -> None:
    """Refuse non-SD1 diffusers folders from model_index.json and the scheduler config."""
    cls = str(index.get("_class_name", ""))
    if "XL" in cls or (folder / "text_encoder_2").is_dir():
        raise refuse(folder, SDXL.replace("(conditioner.embedders / label_emb)", f"({cls or 'text_encoder_2/'})"))
    if "InstructPix2Pix" in cls:
        raise refuse(folder, IP2P)
    if "UnCLIP" in cls or "Upscale" in cls:
        raise refuse(folder, f"{cls} folder: ti-fast trains SD 1.x txt2img/inpainting models only")
    if scheduler is not None and scheduler.get("prediction_type") == "v_prediction":
        raise refuse(folder, VPRED.format(why="scheduler_config.json prediction_type: v_prediction"))
