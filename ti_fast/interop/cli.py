"""`ti-fast inspect` and `ti-fast convert`: argument parsing and printing (the work is in
describe.py, verify.py and convert.py). Building the parsers imports nothing heavy."""
from __future__ import annotations

import json
import sys
from pathlib import Path


def add_interop_parsers(sub) -> None:
    i = sub.add_parser("inspect", help="what an embedding (or hypernetwork) file holds; --verify: which tools load it",
                       description="Describe embedding files of every format ti-fast reads (A1111/original-TI .pt, "
                                   "kohya/OneTrainer/diffusers .safetensors/.bin, PNG/WebP embeddings) and A1111 "
                                   "hypernetworks.")
    i.add_argument("files", nargs="+", metavar="FILE", help="embedding or hypernetwork files")
    i.add_argument("--json", action="store_true", help="print a JSON list, one object per file")
    i.add_argument("--model", metavar="M", help="SD1.x checkpoint: show its typical token norm, check widths against "
                                                "it (reads only its token table)")
    i.add_argument("--tokenizer", metavar="DIR", help="tokenizer folder when --model has none")
    i.add_argument("--verify", action="store_true", help="say whether A1111, ComfyUI, diffusers and InvokeAI load each "
                                                         "file, and under which trigger word")
    i.set_defaults(func=cmd_inspect)

    c = sub.add_parser("convert", help="write an embedding in another format (same vectors, bit for bit)",
                       description="Convert an embedding to A1111 .pt, kohya .safetensors, diffusers .bin/.safetensors "
                                   "or an A1111 PNG embedding. The format defaults from OUT's suffix: .pt a1111, "
                                   ".safetensors kohya, .bin diffusers, .png png.")
    c.add_argument("src", metavar="IN", help="any embedding file ti-fast reads")
    c.add_argument("out", metavar="OUT", help="file to write")
    c.add_argument("--format", choices=("a1111", "kohya", "diffusers", "png"), default=None,
                   help="output format (default: from OUT's suffix)")
    c.add_argument("--image", metavar="PICTURE", help="png: the picture to carry the embedding (default: A1111's plain card)")
    c.add_argument("--name", help="stored name = trigger word of a PNG embedding / diffusers token "
                                  "(default: OUT's stem; png: the source's name)")
    c.add_argument("--force", action="store_true", help="replace an existing OUT")
    c.set_defaults(func=cmd_convert)


def _fail(e) -> int:
    print(f"ti-fast: error: {e}", file=sys.stderr)
    return 2


def _model_facts(model, tokenizer, want_tokenizer: bool):
    """(norm stats, width, tokenizer or None) from the model's token table only."""
    from ..loading.tokens import read_token_table, token_norm_stats
    tt = read_token_table(model)
    tok = None
    if want_tokenizer:                         # for diffusers' vocabulary check only: without one,
        from ..loading import ModelLoadError   # --verify says the check was not made
        from ..loading.tokenizer import tokenizer_for
        try:
            tok, _ = tokenizer_for(tokenizer, tt.model_dir, tt.rows, tt.file)
        except ModelLoadError:
            if tokenizer is not None:          # one the user named must work
                raise
    return token_norm_stats(tt.table), tt.width, tok


def inspect_files(files, model=None, tokenizer=None, verify: bool = False) -> list[dict]:
    """One dict per file (an `error` key where it could not be read or interpreted)."""
    from ..errors import UserError
    from .describe import kind_of
    from .raw import read_raw
    from .verify import verify as verify_file
    norm, width, tok = _model_facts(model, tokenizer, verify) if model else (None, None, None)
    results = []
    for f in files:
        try:
            raw = read_raw(f)
            kind = kind_of(raw)
        except UserError as e:
            results.append({"path": str(f), "kind": None, "format": None, "name": None, "step": None,
                            "vectors": None, "width": None, "error": str(e)})
            continue
        info = kind.describe(raw)
        if norm is not None:
            info["model_token_norm"] = norm
            info["fits_model"] = info["width"] == width if kind.name == "embedding" else None
        if verify:
            info["verify"] = ({t: v.to_dict() for t, v in verify_file(raw, width or 768, tok).items()}
                              if kind.name == "embedding" else None)
        results.append(info)
    return results


def _fmt_norms(norms) -> str:
    if isinstance(norms, dict):
        return "  ".join(f"{k}: {' '.join(f'{x:.3f}' for x in v)}" for k, v in norms.items())
    return " ".join(f"{x:.3f}" for x in norms)


def format_text(info: dict) -> str:
    """The human-readable block of one file."""
    from .verify import LABELS
    lines = [info["path"]]
    step = f"step {info['step']}" if info.get("step") is not None else "step ?"
    if info["kind"] == "hypernetwork":
        lines.append(f"  hypernetwork  {info['format']}  name {info['name']}  {step}  widths "
                     f"{', '.join(map(str, info['widths']))} ({info['family'] or 'unknown model'})")
        if "layer_structure" in info:
            drop = f"dropout {info['dropout_structure']}" if info["use_dropout"] else "dropout off"
            lines.append(f"  layers {info['layer_structure']}  activation {info['activation_func']}  layer norm "
                         f"{'on' if info['is_layer_norm'] else 'off'}  {drop}  activate output "
                         f"{'on' if info['activate_output'] else 'off'}  init {info['weight_initialization']}  "
                         f"{info['parameters']:,} parameters")
            if info["comfyui"]:
                lines.append(f"  ComfyUI: {'; '.join(info['comfyui'])}")
    else:
        width = "+".join(map(str, info["width"])) if isinstance(info["width"], list) else info["width"]
        shape = f"{info['vectors']} vector{'s' if info['vectors'] != 1 else ''} × {width} " \
                f"({info['family'] or 'unknown model'})" if info.get("vectors") else "vectors unreadable"
        also = f" (also in {', '.join(info['encodings'][1:])})" if len(info.get("encodings") or ()) > 1 else ""
        lines.append(f"  embedding  {info['format']}{also}  name {info['name']}  {step}  {shape}")
        if info.get("stored_name") and info["stored_name"] != info["name"]:
            lines.append(f"  stored name {info['stored_name']} (the trigger word is {info['name']})")
        if info.get("norms") is not None:
            ref = info.get("model_token_norm")
            tail = f"   (model's typical token norm {ref['median']:.3f})" if ref else ""
            lines.append(f"  norms {_fmt_norms(info['norms'])}{tail}")
        if info.get("fits_model") is False:
            lines.append("  width does not fit --model")
    trained = info.get("sd_checkpoint_name") or ""
    if info.get("sd_checkpoint"):
        trained += f" [{info['sd_checkpoint']}]"
    lines.append(f"  trained on {trained.strip() or '?'}   file hash {info['hash']}")
    if info.get("error"):
        lines.append(f"  error: {info['error']}")
    for tool, v in (info.get("verify") or {}).items():
        what = f"loads  trigger: {v['trigger']}" if v["loads"] else "no"
        lines.append(f"  {LABELS[tool]:<10}{what}" + (f"  ({v['why']})" if v["why"] else ""))
    return "\n".join(lines)


def cmd_inspect(a) -> int:
    from ..errors import UserError
    try:
        results = inspect_files(a.files, model=a.model, tokenizer=a.tokenizer, verify=a.verify)
    except UserError as e:                     # --model / --tokenizer: before any file is read
        return _fail(e)
    text = "\n\n".join(format_text(r) for r in results if r.get("kind") is not None)
    if a.json:
        print(json.dumps(results, indent=2))
    elif text:
        print(text)
    bad = [r for r in results if r.get("kind") is None]
    for r in bad:
        print(f"ti-fast: error: {r['error']}", file=sys.stderr)
    return 2 if bad else 0


def cmd_convert(a) -> int:
    from ..errors import UserError
    from .convert import convert
    try:
        done = convert(a.src, a.out, fmt=a.format, image=a.image, name=a.name, force=a.force)
    except UserError as e:
        return _fail(e)
    # A1111 and ComfyUI name tensor files by their stem; a PNG by its stored name; diffusers by the key
    trigger = done["name"] if done["format"] in ("png", "diffusers") else Path(done["path"]).stem
    print(f"{done['path']}: {done['format']}, {done['vectors']} × {done['width']}, trigger word {trigger}")
    return 0


__all__ = ["add_interop_parsers", "cmd_inspect", "cmd_convert", "inspect_files", "format_text"]
