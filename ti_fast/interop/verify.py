"""`ti-fast inspect --verify`: would A1111, ComfyUI, diffusers and InvokeAI load this embedding
file, and under which trigger word? Each function replays one tool's loading rules on the stored
object (interop.raw), as read in that tool's source:

  A1111 v1.10.1   AUTOMATIC1111/stable-diffusion-webui modules/textual_inversion/textual_inversion.py
                  (EmbeddingDatabase.load_from_file, register_embedding_by_name) and
                  ../shared/spec/a1111-compat.md "Embedding files"
  ComfyUI         comfyanonymous/ComfyUI comfy/sd1_clip.py (load_embed, safe_load_embed_zip,
                  SDTokenizer._try_get_embedding / tokenize_with_weights, SDClipModel's
                  set_up_textual_embeddings), commit b55c224
  diffusers 0.42  huggingface/diffusers src/diffusers/loaders/textual_inversion.py
                  (load_textual_inversion_state_dicts, _retrieve_tokens_and_embeddings, the width
                  check in load_textual_inversion) and src/diffusers/models/model_loading_utils.py
                  (load_state_dict: torch.load with weights_only=True)
  InvokeAI        invoke-ai/InvokeAI invokeai/backend/model_manager/configs/textual_inversion.py
                  (_file_looks_like_embedding, _get_base_or_raise), .../model_on_disk.py
                  (load_state_dict), invokeai/backend/textual_inversion.py (from_checkpoint),
                  invokeai/backend/model_patcher.py (apply_ti: triggers and the width check),
                  invokeai/app/util/ti_utils.py (extract_ti_triggers_from_prompt)

A verdict is (loads, trigger, why): `why` names the rule that refuses the file, or a caveat
when it loads. `width` is the model's token width (768 for SD1). The diffusers vocabulary clash
(a name that is already a CLIP token) is checked only when a tokenizer is given.
"""
from __future__ import annotations

import re
import zipfile
from dataclasses import asdict, dataclass

import torch

from .raw import RawFile

TOOLS = ("a1111", "comfyui", "diffusers", "invokeai")
LABELS = {"a1111": "A1111", "comfyui": "ComfyUI", "diffusers": "diffusers", "invokeai": "InvokeAI"}
PROMPT_SYNTAX = set("()[]:\\")                               # A1111 and ComfyUI prompt syntax
INVOKEAI_TRIGGER = re.compile(r"<[a-zA-Z0-9., _-]+>")        # ti_utils.extract_ti_triggers_from_prompt
INVOKEAI_BASES = {768: "SD1", 1024: "SD2", 1280: "SDXL"}


@dataclass
class Verdict:
    loads: bool
    trigger: str | None
    why: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def _no(why: str) -> Verdict:
    return Verdict(False, None, why)


def _rows_fit(vec, width: int) -> str:
    """'' when every vector of `vec` ([N, D] or [D]) is `width` wide, else why not."""
    if not torch.is_tensor(vec) or vec.ndim not in (1, 2) or vec.numel() == 0:
        return f"the vectors are not a [N, {width}] tensor"
    if vec.shape[-1] != width:
        return f"vectors are {vec.shape[-1]} wide, the model's tokens {width}"
    return ""


def _syntax_note(name: str) -> str:
    bad = sorted(set(name) & PROMPT_SYNTAX)
    return f"type {' '.join(bad)} escaped with \\ in the prompt (prompt syntax)" if bad else ""


# ---------------------------------------------------------------- A1111
def a1111(raw: RawFile, width: int = 768) -> Verdict:
    name, ext = raw.path.stem, raw.ext.upper()
    if ext in (".PNG", ".WEBP", ".JXL", ".AVIF"):
        if raw.path.stem.upper().endswith(".PREVIEW"):
            return _no("*.preview.* images are thumbnails to A1111, not embeddings")
        if not raw.is_image:
            return _no("not an image although named like one")
        name = raw.data.get("name", name)                    # data.get('name', name): may be None
    elif ext in (".BIN", ".PT"):
        if raw.container not in ("torch-zip", "torch-legacy"):
            return _no(f"A1111 reads {raw.ext} files with torch.load; this one is {raw.container}")
    elif ext == ".SAFETENSORS":
        if raw.container != "safetensors":
            return _no(f"A1111 reads .safetensors with safetensors; this one is {raw.container}")
    else:
        return _no(f"A1111 reads .pt/.bin/.safetensors and .png/.webp/.jxl/.avif files, not {raw.ext or 'this'}")
    if raw.size == 0:
        return _no("empty files are skipped")
    d = raw.data
    if not isinstance(d, dict):
        return _no("not a dict")
    if "string_to_param" in d:
        params = getattr(d["string_to_param"], "_parameters", d["string_to_param"])
        if len(params) != 1:
            return _no(f"string_to_param holds {len(params)} entries ('embedding file has multiple terms in it')")
        vec = next(iter(params.values()))
    elif "clip_g" in d and "clip_l" in d:
        return _no(f"SDXL embedding (clip_l + clip_g): skipped on a {width}-wide model")
    elif d and type(next(iter(d.values()))) is torch.Tensor:   # A1111 compares the exact type
        if len(d) != 1:
            return _no(f"{len(d)} entries, not one ('embedding file has multiple terms in it')")
        vec = next(iter(d.values()))
    else:
        return _no("neither string_to_param nor a dict whose first value is a tensor")
    why = _rows_fit(vec, width)
    if why:
        return _no(f"skipped: {why}")
    if not isinstance(name, str) or not name.strip():
        return _no("the name gives no tokens: nothing in a prompt can match it")
    return Verdict(True, name, _syntax_note(name))


# ---------------------------------------------------------------- ComfyUI
def _comfy_zip_fallback(raw: RawFile):
    """safe_load_embed_zip: the raw float32 bytes of the last data/ entry with >= 768 values,
    768 wide when divisible by 768, else 1024."""
    with zipfile.ZipFile(raw.path) as z:
        for n in [n for n in z.namelist() if "data/" in n][::-1]:
            data = z.read(n)
            number = len(data) // 4
            if number < 768:
                continue
            length = 768 if number % 768 == 0 else 1024
            return torch.frombuffer(bytearray(data[: number * 4]), dtype=torch.float32).reshape(number // length, length)
    return None


def comfyui(raw: RawFile, width: int = 768) -> Verdict:
    path = raw.path
    if raw.is_image:
        return _no("ComfyUI loads .safetensors/.pt/.bin embeddings, not images")
    # embedding:NAME finds NAME, then NAME.safetensors / .pt / .bin (these spellings only)
    word = path.stem if path.suffix in (".safetensors", ".pt", ".bin") else path.name
    if any(ch.isspace() for ch in word):
        return _no(f"the name {word!r} has a space: ComfyUI's embedding:NAME ends at the first space")
    try:
        if path.name.lower().endswith(".safetensors"):
            if raw.container != "safetensors":
                return _no(f"read with safetensors (by its suffix) but it is {raw.container}")
            embed = raw.data
        elif raw.container == "torch-zip" and raw.parameter_dict:
            embed = _comfy_zip_fallback(raw)            # weights_only refuses ParameterDict
            if embed is None:
                return _no("torch.load(weights_only=True) refuses it and the raw zip fallback finds no vectors")
        elif raw.container in ("torch-zip", "torch-legacy") and not raw.parameter_dict:
            embed = raw.data
        else:
            return _no(f"torch.load(weights_only=True) cannot read this {raw.container} file")
        if isinstance(embed, dict):
            if "string_to_param" in embed:
                embed = next(iter(embed["string_to_param"].values()))
            elif "clip_l" in embed:                     # SD1's embedding key: SDXL files give their clip_l
                embed = embed["clip_l"]
            else:
                bundled = [v for k, v in embed.items() if isinstance(k, str) and k.startswith("bundle_emb.")]
                embed = bundled[0] if bundled else next(iter(embed.values()))
    except Exception as e:                              # ComfyUI logs and skips whatever fails here
        return _no(f"load_embed fails ({type(e).__name__})")
    why = _rows_fit(embed, width)
    if why:
        return _no(f"ignored: {why}")
    notes = [_syntax_note(word)]
    if isinstance(raw.data, dict) and "string_to_param" in raw.data and len(raw.data["string_to_param"]) > 1:
        notes.append("uses the first of several string_to_param entries")
    elif embedding_tensor_count(raw) > 1 and "clip_l" not in raw.data:
        notes.append("uses the first of several tensors")
    return Verdict(True, f"embedding:{word}", "; ".join(n for n in notes if n))


def embedding_tensor_count(raw: RawFile) -> int:
    return sum(torch.is_tensor(v) for v in raw.data.values()) if isinstance(raw.data, dict) else 0


# ---------------------------------------------------------------- diffusers
def diffusers(raw: RawFile, width: int = 768, tokenizer=None) -> Verdict:
    if raw.is_image:
        return _no("load_textual_inversion reads .safetensors/.bin/.pt files, not images")
    # safetensors is tried first whatever the suffix; the pickle fallback is torch.load(weights_only=True)
    if raw.container != "safetensors":
        if raw.path.name.split(".")[-1] == "safetensors":
            return _no(f"named .safetensors but it is {raw.container}")
        if raw.parameter_dict:
            return _no("torch.load(weights_only=True) refuses the pickled torch.nn.ParameterDict (original TI file)")
    sd = raw.data
    if not isinstance(sd, dict):
        return _no("not a dict of tensors")
    note = ""
    if len(sd) == 1:
        token, emb = next(iter(sd.items()))
        if token in ("emb_params", "emp_params"):
            note = f"the token is the key {token!r}: pass token=... to choose the trigger"
    elif "string_to_param" in sd:
        token, emb = sd.get("name"), sd["string_to_param"].get("*")
        if emb is None:
            return _no("string_to_param has no '*' entry")
    else:
        return _no(f"{len(sd)} entries and no string_to_param ('Loaded state dictionary is incorrect')")
    if not isinstance(token, str) or not token:
        return _no("no name stored to use as the token: load it with token=...")
    if tokenizer is not None:
        vocab = tokenizer.get_vocab()
        if token in vocab:
            return _no(f"{token!r} is already in the tokenizer's vocabulary: load it with another token=...")
    why = _rows_fit(emb, width)
    if why:
        return _no(f"'Loaded embeddings are of incorrect shape': {why}")
    if tokenizer is None:
        note = "; ".join(n for n in (note, "vocabulary not checked without --model") if n)
    if emb.ndim == 2 and emb.shape[0] > 1:
        n = emb.shape[0]
        extra = f"{token}_1" if n == 2 else f"{token}_1 … {token}_{n - 1}"
        note = "; ".join(s for s in (note, f"expands to {token} {extra}") if s)
    return Verdict(True, token, note)


# ---------------------------------------------------------------- InvokeAI
def invokeai(raw: RawFile, width: int = 768) -> Verdict:
    path = raw.path
    if raw.is_image or path.suffix not in (".safetensors", ".bin", ".pt", ".ckpt", ".pth"):
        return _no("InvokeAI installs .safetensors/.pt/.bin/.ckpt/.pth embeddings (suffix as spelled)")
    if path.suffix == ".safetensors" and raw.container != "safetensors":
        return _no(f"named .safetensors but it is {raw.container}")
    if path.suffix != ".safetensors":
        if raw.container not in ("torch-zip", "torch-legacy"):
            return _no(f"read with torch.load (by its suffix) but it is {raw.container}")
        if raw.parameter_dict:
            return _no("torch.load's weights-only default (torch >= 2.6) refuses the pickled torch.nn.ParameterDict")
    sd = raw.data
    if not isinstance(sd, dict):
        return _no("not a dict")
    sd = sd.get("state_dict", sd)
    looks = (path.name in ("learned_embeds.bin", "learned_embeds.safetensors")
             or any(k in ("string_to_param", "emb_params", "clip_g") for k in sd)
             or (len(sd) < 10 and all(torch.is_tensor(v) for v in sd.values())))
    if not looks:
        return _no("not recognised as an embedding (no string_to_param/emb_params/clip_g, not a small dict of tensors)")
    try:                                                # _get_base_or_raise
        if "string_to_token" in sd:
            dim = list(sd["string_to_param"].values())[0].shape[-1]
        elif "emb_params" in sd:
            dim = sd["emb_params"].shape[-1]
        elif "clip_g" in sd:
            dim = sd["clip_g"].shape[-1]
        else:
            dim = list(sd.values())[0].shape[0]         # dim 0, so a 2-D [N, 768] tensor reads as N
    except Exception as e:
        return _no(f"cannot determine the token dimension ({type(e).__name__})")
    base = INVOKEAI_BASES.get(int(dim))
    if base is None:
        return _no(f"unrecognised token dimension {int(dim)}")
    if base != INVOKEAI_BASES.get(width):
        return _no(f"installed as a {base} embedding, not usable with a {INVOKEAI_BASES.get(width, str(width))} model")
    # TextualInversionModelRaw.from_checkpoint, then apply_ti's width check
    if "string_to_param" in sd:
        emb = next(iter(sd["string_to_param"].values()))
    elif "emb_params" in sd:
        emb = sd["emb_params"]
    elif "clip_g" in sd and "clip_l" in sd:
        emb = sd["clip_l"] if sd["clip_l"].shape[-1] == width else sd["clip_g"]
    else:
        emb = next(iter(sd.values()))
        emb = emb.unsqueeze(0) if torch.is_tensor(emb) and emb.ndim == 1 else emb
    why = _rows_fit(emb, width)
    if why:
        return _no(f"'Cannot load embedding': {why}")
    # ModelOnDisk.name: the stem for these four suffixes, the whole file name otherwise
    trigger = f"<{path.stem if path.suffix in ('.safetensors', '.bin', '.pt', '.ckpt') else path.name}>"
    if INVOKEAI_TRIGGER.fullmatch(trigger) is None:
        return _no(f"{trigger} cannot be typed: InvokeAI finds triggers matching <[a-zA-Z0-9., _-]+>")
    return Verdict(True, trigger)                       # the model's name: the stem unless renamed in InvokeAI


def verify(raw: RawFile, width: int = 768, tokenizer=None) -> dict[str, Verdict]:
    """{tool: Verdict} for the four tools, in TOOLS order."""
    return {"a1111": a1111(raw, width), "comfyui": comfyui(raw, width),
            "diffusers": diffusers(raw, width, tokenizer), "invokeai": invokeai(raw, width)}


__all__ = ["TOOLS", "LABELS", "Verdict", "verify", "a1111", "comfyui", "diffusers", "invokeai"]
