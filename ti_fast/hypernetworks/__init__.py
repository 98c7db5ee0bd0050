"""A1111 hypernetworks: the file format, creation, the UNet attention hook, prompt tags.

    module.py        HypernetworkModule (A1111's MLP), Structure, activations, init, recompute-safe dropout
    hypernetwork.py  Hypernetwork: (k, v) module pair per width + metadata; file dict, save, snapshot/restore
    format.py        read_hypernetwork (weights-only, explicit allow-list), describe, HypernetworkError
    create.py        new_hypernetwork, structure_from_options / options_structure (the create flags),
                     model_widths (from the header), sanitize_name
    hooks.py         attach / detach / attached: kv hooks on the UNet's CrossAttention modules
    tags.py          <hypernet:NAME:STRENGTH> parsing, find_hypernetworks, plan_prompts (generation)
    cli.py           `ti-fast create-hypernetwork`

Trainer-facing API (what a training "trainable" needs):

    from ti_fast.hypernetworks import (Hypernetwork, new_hypernetwork, structure_from_options,
        read_hypernetwork, model_widths, unet_widths, check_widths, attach, detach, attached)

    s  = structure_from_options("1,2,1", "relu", "normal", layer_norm=False, dropout_structure="0,0.3,0")
    hn = new_hypernetwork(name, widths, s, seed=seed)      # create: A1111 init, step 0, eval mode
    hn = read_hypernetwork(path)                           # or load (= ti_fast.load_hypernetwork)
    params = hn.master_parameters()                        # fp32 leaf Parameters for the optimizer
    hn.train(); attach(unet, [(hn, 1.0)])                  # dropout on, strength 1, moved to the UNet's device
    hn.advance_dropout()                                   # once per micro-batch, BEFORE its forward
                                                           # (in-place device op: put it inside a graphed step;
                                                           # never between forward and backward)
    snap = hn.snapshot(); hn.restore(snap)                 # NaN rollback: copies in place, params keep identity
    hn.state_dict() / hn.load_state_dict(sd)               # resume: weights + dropout seed (bitwise)
    hn.save(path, step=..., name=..., sd_checkpoint=..., sd_checkpoint_name=...)   # A1111 .pt, atomic
    hn.eval(); sample_images(...); hn.train()              # previews: the attachment stays, dropout off
    detach(unet)                                           # the plain UNet again

Widths: `model_widths(path)` reads them from a checkpoint's header/config without building it
([768, 320, 640, 1280] on SD1); `unet_widths(unet)` from a built UNet; `check_widths(sizes,
widths)` refuses a width the model lacks. Every refusal is a `HypernetworkError` (a UserError).
The hook computes in fp32 and casts back to the UNet's dtype; it has no host syncs and no
branching on tensor values (gradient checkpointing, channels_last, CUDA graphs); dropout masks
are a hash of hn.dropout_seed, so a checkpointed block recomputes the same mask.
"""
import importlib

# public name -> the module that defines it, imported on first use (PEP 562): registering the
# `create-hypernetwork` subcommand (ti-fast --help) must not import torch.
_EXPORTS = {
    **dict.fromkeys(("attach", "attached", "detach", "unet_widths"), ".hooks"),
    **dict.fromkeys(("check_widths", "model_widths", "new_hypernetwork", "options_structure", "parse_sizes",
                     "sanitize_name", "structure_from_options"), ".create"),
    **dict.fromkeys(("HypernetworkError", "NotAHypernetworkError", "EmbeddingNotHypernetworkError", "describe",
                     "is_hypernetwork_dict", "hypernetwork_from_dict", "comfyui_differences",
                     "looks_like_embedding", "read_hypernetwork", "load_hypernetwork"), ".format"),
    "Hypernetwork": ".hypernetwork",
    **dict.fromkeys(("ACTIVATIONS", "INITS", "HypernetworkModule", "Structure"), ".module"),
    **dict.fromkeys(("find_hypernetworks", "parse_extra_networks", "plan_prompts"), ".tags"),
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
