"""A1111 v1.10.1's API fields -> ti-fast's, and ti-fast's results -> A1111's response shapes.

Pure functions; the routes are in api_a1111.py.

Sources: A1111's modules/api/models.py (request/response models: TextToImageResponse,
PNGInfoResponse, ProgressResponse, EmbeddingsResponse, SDModelItem, SamplerItem, HypernetworkItem,
CreateResponse, TrainResponse) and modules/api/api.py (handlers; create/train pass their JSON
object as keyword arguments to create_embedding(name, num_vectors_per_token, overwrite_old,
init_text), train_embedding(id_task, embedding_name, learn_rate, ...), create_hypernetwork(name,
enable_sizes, overwrite_old, layer_structure, activation_func, weight_init, add_layer_norm,
use_dropout, dropout_structure) and train_hypernetwork(id_task, hypernetwork_name, ...)).
A field ti-fast cannot honour is accepted and named in the response's `info`.
"""
from __future__ import annotations

import json
import random

# ---------------------------------------------------------------------------- training
# A1111's Train-tab defaults, used for fields a client leaves out (A1111 itself needs them all).
TRAIN_DEFAULTS = {
    "learn_rate": "0.005", "batch_size": 1, "gradient_step": 1, "data_root": "", "log_directory": "textual_inversion",
    "training_width": 512, "training_height": 512, "varsize": False, "steps": 100000, "clip_grad_mode": "disabled",
    "clip_grad_value": "0.1", "shuffle_tags": False, "tag_drop_out": 0.0, "latent_sampling_method": "once",
    "use_weight": False, "create_image_every": 500, "save_embedding_every": 500, "save_hypernetwork_every": 500,
    "template_filename": "style_filewords.txt", "save_image_with_stored_embedding": True,
    "preview_from_txt2img": False, "preview_prompt": "", "preview_negative_prompt": "", "preview_steps": 20,
    "preview_sampler_name": "Euler a", "preview_cfg_scale": 7.0, "preview_seed": -1, "preview_width": 512,
    "preview_height": 512,
}
HYPERNETWORK_LR = "0.00001"
# field -> TrainConfig key, for the fields that carry over as they are
_SAME = {"batch_size": "batch_size", "gradient_step": "grad_accum", "training_width": "width",
         "training_height": "height", "steps": "steps", "shuffle_tags": "shuffle_tags", "tag_drop_out": "tag_dropout",
         "latent_sampling_method": "latents", "use_weight": "alpha_weight", "create_image_every": "preview_every"}
TRAIN_FIELDS = set(TRAIN_DEFAULTS) | {"id_task", "embedding_name", "hypernetwork_name", "preview_sampler_index"}


def train_settings(body: dict, kind: str) -> tuple[str, dict, list[str]]:
    """(name, TrainConfig keys with data/log paths still as sent, fields not honoured).
    data_root/log_directory are resolved by the caller (inside HOME); `embedding`/`hypernetwork`
    (the file trained in place) too."""
    name_key = "embedding_name" if kind == "embedding" else "hypernetwork_name"
    v = {**TRAIN_DEFAULTS, **({"learn_rate": HYPERNETWORK_LR} if kind == "hypernetwork" else {}),
         **{k: x for k, x in body.items() if x is not None}}
    name = str(v.get(name_key) or "").strip()
    if not name:
        raise ValueError(f"{name_key} is required ({kind} not selected)")
    ignored = [f"{k} (unknown field)" for k in body if k not in TRAIN_FIELDS]
    run = {dst: v[src] for src, dst in _SAME.items()}
    run["name"] = name
    run["lr"] = str(v["learn_rate"])
    run["tag_dropout"] = float(run["tag_dropout"])
    mode = str(v["clip_grad_mode"]).lower()
    if mode in ("value", "norm"):
        run["clip_grad"] = f"{mode}:{v['clip_grad_value']}"
    elif mode != "disabled":
        ignored.append(f"clip_grad_mode {v['clip_grad_mode']!r} (not disabled/value/norm: no clipping)")
    run["save_every"] = int(v["save_embedding_every" if kind == "embedding" else "save_hypernetwork_every"] or 0)
    run["preview_every"] = int(run["preview_every"] or 0)
    if v["varsize"]:
        ignored.append("varsize (ti-fast trains every image at training_width x training_height)")
    template = str(v["template_filename"] or "")
    run["template"] = template[:-4] if template.lower().endswith(".txt") else template
    if kind == "embedding":
        run["png_embed"] = bool(v["save_image_with_stored_embedding"]) and run["preview_every"] > 0
    if v["preview_from_txt2img"]:
        from ..diffusion.samplers import sampler_key
        from ..errors import ConfigError
        run.update(preview_prompt=str(v["preview_prompt"]), preview_negative=str(v["preview_negative_prompt"] or ""),
                   preview_steps=int(v["preview_steps"]), preview_cfg=float(v["preview_cfg_scale"]))
        seed = int(v["preview_seed"])
        run["preview_seed"] = seed if seed >= 0 else random.SystemRandom().randrange(2**32)
        label = v.get("preview_sampler_index") if "preview_sampler_name" not in body else v["preview_sampler_name"]
        try:
            run["preview_sampler"] = sampler_key(label or "Euler a")
        except ConfigError:
            ignored.append(f"preview_sampler_name {label!r} (not available: previews use Euler a)")
        if (int(v["preview_width"]), int(v["preview_height"])) != (run["width"], run["height"]):
            ignored.append("preview_width/preview_height (previews are drawn at the training size)")
    return name, run, ignored


def train_info(kind: str, filename: str, error: str | None, ignored: list[str]) -> str:
    """A1111's TrainResponse text (its hypernetwork route says "train embedding" too: kept, since
    scripts match on it), plus the fields ti-fast did not honour."""
    text = f"train embedding complete: filename: {filename} error: {error}"
    return text + (f" (not honoured: {'; '.join(ignored)})" if ignored else "")


# ---------------------------------------------------------------------------- txt2img
# StableDiffusionProcessingTxt2Img's API fields and their defaults (A1111 v1.10.1).
TXT2IMG_DEFAULTS = {
    "prompt": "", "negative_prompt": "", "styles": None, "seed": -1, "subseed": -1, "subseed_strength": 0,
    "seed_resize_from_h": -1, "seed_resize_from_w": -1, "sampler_name": None, "scheduler": None, "batch_size": 1,
    "n_iter": 1, "steps": 50, "cfg_scale": 7.0, "width": 512, "height": 512, "restore_faces": None, "tiling": None,
    "do_not_save_samples": False, "do_not_save_grid": False, "eta": None, "denoising_strength": None,
    "s_min_uncond": None, "s_churn": None, "s_tmax": None, "s_tmin": None, "s_noise": None, "override_settings": None,
    "override_settings_restore_afterwards": True, "refiner_checkpoint": None, "refiner_switch_at": None,
    "disable_extra_networks": False, "firstpass_image": None, "comments": None, "enable_hr": False,
    "firstphase_width": 0, "firstphase_height": 0, "hr_scale": 2.0, "hr_upscaler": None, "hr_second_pass_steps": 0,
    "hr_resize_x": 0, "hr_resize_y": 0, "hr_checkpoint_name": None, "hr_sampler_name": None, "hr_scheduler": None,
    "hr_prompt": "", "hr_negative_prompt": "", "force_task_id": None, "sampler_index": "Euler", "script_name": None,
    "script_args": [], "send_images": True, "save_images": False, "alwayson_scripts": {}, "infotext": None,
}
# honoured (or meaningless here: task ids, comments, the save switches A1111 derives itself)
_HONOURED = {"prompt", "negative_prompt", "seed", "sampler_name", "sampler_index", "scheduler", "batch_size", "n_iter",
             "steps", "cfg_scale", "width", "height", "override_settings", "send_images", "save_images",
             "force_task_id", "comments", "do_not_save_samples", "do_not_save_grid",
             "override_settings_restore_afterwards", "subseed", "styles"}
_SCHEDULERS = {"automatic": None, "karras": True, "uniform": False}
MAX_N_ITER = 100                     # A1111's "Batch count" slider stops at 100


def txt2img_settings(body: dict, model_title: str, model_name: str) -> tuple[dict, dict, int, list[str]]:
    """(GenerateConfig keys, the request with A1111's defaults filled in, n_iter, fields not honoured)."""
    from ..diffusion.samplers import sampler_key
    from ..errors import ConfigError
    req = {**TXT2IMG_DEFAULTS, **body}
    ignored = [f"{k} (unknown field)" for k in body if k not in TXT2IMG_DEFAULTS]
    for k, default in TXT2IMG_DEFAULTS.items():
        if k in body and k not in _HONOURED and body[k] not in (default, None, "", [], {}, 0, False):
            ignored.append(k)
    label = req.get("sampler_name") or req.get("sampler_index") or "Euler"
    try:
        sampler = sampler_key(label)
    except ConfigError:
        ignored.append(f"sampler_name {label!r} (not available: used Euler)")
        sampler = "euler"
    sched, karras = req.get("scheduler"), None
    if sched is not None:
        if str(sched).lower() in _SCHEDULERS:
            karras = _SCHEDULERS[str(sched).lower()]
        else:
            ignored.append(f"scheduler {sched!r} (not available: the sampler's own schedule)")
        if sampler == "ddim" and karras:
            ignored.append("scheduler Karras (DDIM uses its own timesteps)")
            karras = None
    clip_skip = 1
    overrides = req.get("override_settings") or {}
    if not isinstance(overrides, dict):
        raise TypeError(f"override_settings must be an object of setting: value, not {type(overrides).__name__}")
    for k, val in overrides.items():
        if k == "CLIP_stop_at_last_layers":
            clip_skip = int(val)
        elif k == "sd_model_checkpoint" and _names_model(str(val), model_title, model_name):
            continue
        else:
            ignored.append(f"override_settings.{k}")
    seed = int(req["seed"])
    seed = seed if seed >= 0 else random.SystemRandom().randrange(2**32)
    req["subseed"] = int(req.get("subseed", -1))          # checked here: the answer's info reads it after generating
    gen = {"prompt": str(req["prompt"] or ""), "negative_prompt": str(req["negative_prompt"] or ""),
           "sampler": sampler, "karras": karras, "steps": int(req["steps"]), "cfg": float(req["cfg_scale"]),
           "seed": seed, "width": int(req["width"]), "height": int(req["height"]), "batch": int(req["batch_size"]),
           "clip_skip": clip_skip}
    n_iter = max(1, int(req["n_iter"]))
    if n_iter > MAX_N_ITER:          # each batch holds the worker (and the training jobs) until it is done
        raise ValueError(f"n_iter {n_iter}: at most {MAX_N_ITER} (A1111's batch count limit)")
    return gen, req, n_iter, ignored


def _names_model(value: str, title: str, name: str) -> bool:
    """A1111 names a checkpoint by title ('file.safetensors [hash]'), file name or stem."""
    return value in (title, name) or value.split(" [")[0].rsplit(".", 1)[0] == name


def txt2img_info(req: dict, gen: dict, seeds: list[int], infotexts: list[str], model_info, label: str,
                 ignored: list[str], timestamp: str) -> str:
    """Processed.js(): the JSON string A1111 answers in `info` (its keys), plus `ignored`."""
    sub = req["subseed"]
    sub = sub if sub >= 0 else random.SystemRandom().randrange(2**32)
    obj = {"prompt": gen["prompt"], "all_prompts": [gen["prompt"]] * len(seeds),
           "negative_prompt": gen["negative_prompt"], "all_negative_prompts": [gen["negative_prompt"]] * len(seeds),
           "seed": seeds[0], "all_seeds": seeds, "subseed": sub, "all_subseeds": [sub + i for i in range(len(seeds))],
           "subseed_strength": req.get("subseed_strength", 0), "width": gen["width"], "height": gen["height"],
           "sampler_name": label, "cfg_scale": gen["cfg"], "steps": gen["steps"], "batch_size": gen["batch"],
           "restore_faces": False, "face_restoration_model": None, "sd_model_name": model_info.name,
           "sd_model_hash": model_info.hash, "sd_vae_name": None, "sd_vae_hash": None,
           "seed_resize_from_w": -1, "seed_resize_from_h": -1, "denoising_strength": req.get("denoising_strength"),
           "extra_generation_params": {}, "index_of_first_image": 0, "infotexts": infotexts,
           "styles": req.get("styles") or [], "job_timestamp": timestamp, "clip_skip": gen["clip_skip"],
           "is_using_inpainting_conditioning": False, "version": _version(), "ignored": ignored}
    return json.dumps(obj)


def _version() -> str:
    from ..infotext import VERSION
    return VERSION


# ---------------------------------------------------------------------------- png-info, lists

def png_info_parameters(text: str) -> dict:
    """A1111's parse_generation_parameters, the part that needs no UI: Prompt, Negative prompt,
    every key, and 'WxH' values split into KEY-1 / KEY-2."""
    from ..infotext import parse_infotext
    out = {}
    for k, v in parse_infotext(text).items():
        w, x, h = v.partition("x")
        if k not in ("Prompt", "Negative prompt") and x and w.isdigit() and h.isdigit():
            out[f"{k}-1"], out[f"{k}-2"] = w, h
        else:
            out[k] = v
    return out


def sampler_items() -> list[dict]:
    """SamplerItem: name (A1111's label), aliases, options."""
    from ..diffusion.samplers import SAMPLERS
    return [{"name": i.label, "aliases": [k], "options": {"scheduler": "karras"} if i.default_schedule == "karras" else {}}
            for k, i in SAMPLERS.items()]


def model_item(info, tokenizer=None) -> dict:
    """SDModelItem for the loaded model."""
    from pathlib import Path
    path = Path(str(info.path))
    short = (info.hash or "")[:10] or None
    return {"title": f"{path.name} [{short}]" if short else path.name, "model_name": info.name, "hash": short,
            "sha256": getattr(info, "sha256", None), "filename": str(path), "config": None}


def embedding_item(d: dict) -> dict:
    """EmbeddingItem from an inspect description."""
    return {"step": d.get("step"), "sd_checkpoint": d.get("sd_checkpoint"),
            "sd_checkpoint_name": d.get("sd_checkpoint_name"), "shape": d.get("width"), "vectors": d.get("vectors")}


def decode_image_field(value: str) -> bytes:
    """An A1111 image field: raw base64 or a data: URL (as its clients send). URLs to fetch are refused."""
    import base64
    import binascii
    s = str(value).strip()
    if s.startswith(("http://", "https://")):
        raise ValueError("image URLs are not fetched: send the image as base64")
    if s.startswith("data:"):
        s = s.split(",", 1)[1] if "," in s else ""
    try:
        return base64.b64decode(s, validate=False)
    except (binascii.Error, ValueError):
        raise ValueError("image: not valid base64") from None
