"""A1111 "infotext": the generation parameters stored in a PNG's `parameters` tEXt chunk,
which the webui's PNG Info tab, Civitai and other tools parse.

Format (A1111 v1.10.1 processing.create_infotext):

    <prompt>
    Negative prompt: <negative prompt>            (line left out when empty)
    Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 123,
    Size: 512x512, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Clip skip: 2,
    TI hashes: "foo: 0123456789ab, bar: ba9876543210", Version: v1.10.1

(the parameters are one line). A value containing "," ":" or a newline is written as
json.dumps(value, ensure_ascii=False) (A1111 infotext_utils.quote); "Clip skip" only when > 1.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from PIL import Image, PngImagePlugin

from . import __version__
from .fsutil import atomic_path

VERSION = f"ti-fast v{__version__}"     # the infotext's "Version" value
# A1111 infotext_utils.re_param: `key: value` where value is a JSON string or runs to a comma.
_RE_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
PARAMETERS_KEY = "parameters"


def quote(value) -> str:
    """A1111's quote(): JSON-quote text containing , : or newline; other values as str()."""
    text = str(value)
    if "," not in text and "\n" not in text and ":" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def unquote(text: str) -> str:
    if len(text) < 2 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        return json.loads(text)
    except ValueError:
        return text


def format_number(x) -> str:
    """7.0 -> "7", 7.5 -> "7.5": A1111 gets whole CFG values from the UI as ints."""
    f = float(x)
    return str(int(f)) if f.is_integer() else repr(f)


def format_ti_hashes(ti_hashes: dict[str, str]) -> str:
    """{"foo": "0123456789ab"} -> "foo: 0123456789ab"; A1111 strips : and , from the names
    so the list stays parseable."""
    return ", ".join(f"{name.replace(':', '').replace(',', '')}: {h}" for name, h in ti_hashes.items())


def parse_ti_hashes(text: str) -> dict[str, str]:
    """Inverse of format_ti_hashes."""
    out = {}
    for item in text.split(","):
        if ":" in item:
            name, h = item.split(":", 1)
            out[name.strip()] = h.strip()
    return out


def make_infotext(prompt: str, negative_prompt: str = "", *, steps: int, sampler: str,
                  schedule_type: str, cfg_scale: float, seed: int, width: int, height: int,
                  model_hash: str | None, model_name: str | None, clip_skip: int = 1,
                  ti_hashes: dict[str, str] | None = None, version: str | None) -> str:
    """The infotext string, fields in A1111 v1.10.1 order; None-valued fields are left out
    (as A1111 does when the matching "add ... to infotext" option is off).

    schedule_type: "Automatic" when the sampler's default schedule is used.
    ti_hashes: trigger word -> 12-hex Embedding.shorthash of each embedding the prompts used."""
    params = {
        "Steps": int(steps),
        "Sampler": sampler,
        "Schedule type": schedule_type,
        "CFG scale": format_number(cfg_scale),
        "Seed": int(seed),
        "Size": f"{int(width)}x{int(height)}",
        "Model hash": model_hash,
        "Model": model_name,
        "Clip skip": int(clip_skip) if clip_skip and int(clip_skip) > 1 else None,
        "TI hashes": format_ti_hashes(ti_hashes) if ti_hashes else None,
        "Version": version,
    }
    text = ", ".join(f"{k}: {quote(v)}" for k, v in params.items() if v is not None)
    negative = f"\nNegative prompt: {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{negative}\n{text}".strip()


def parse_infotext(text: str) -> dict[str, str]:
    """Splits an infotext into {"Prompt", "Negative prompt", <key>: <value>...}. Values are
    unquoted strings exactly as written ("Size": "512x512"); unlike A1111's
    parse_generation_parameters no defaults are filled in for absent keys."""
    *lines, last = text.strip().split("\n")
    # Like A1111: the last line holds the parameters only if it parses as >= 3 of them.
    if len(_RE_PARAM.findall(last)) < 3:
        lines.append(last)
        last = ""
    prompt, negative, in_negative = [], [], False
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    out = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for key, value in _RE_PARAM.findall(last):
        out[key] = unquote(value) if value[:1] == '"' and value[-1:] == '"' else value
    return out


def write_png_with_infotext(image: Image.Image, path, infotext: str,
                            extra_chunks: dict[str, str] | None = None) -> Path:
    """Saves `image` as PNG with the infotext in the `parameters` text chunk (plus any
    extra text chunks, e.g. {"sd-ti-embedding": ...}), atomically. Text that is not
    Latin-1 goes into an iTXt chunk (Pillow's add_text does that), which A1111 reads too."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"{path}: infotext is written into PNG chunks; use a .png name")
    info = PngImagePlugin.PngInfo()
    info.add_text(PARAMETERS_KEY, infotext)
    for key, value in (extra_chunks or {}).items():
        info.add_text(key, value)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)
    return path


def read_png_infotext(source) -> str | None:
    """The `parameters` chunk of a PNG (path or open image), None when absent."""
    if not isinstance(source, Image.Image):
        with Image.open(source) as image:
            return read_png_infotext(image)
    text = getattr(source, "text", None) or {}
    return text.get(PARAMETERS_KEY) or source.info.get(PARAMETERS_KEY)
