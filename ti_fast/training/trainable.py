"""What a run trains, as one object (PEFT's adapters are the model): the model stays frozen and the
trainable says which parameters exist, how they enter the model, what of it is resumable state,
how it is saved and how previews see it. The loop, the step and the checkpointer only talk to
this interface:

    kind                      "embedding" (a hypernetwork and a group of embeddings are others)
    name                      trigger word / file stem
    parameters()              fp32 master tensors the optimizer updates (requires_grad)
    context(te, mb, skip)     the UNet's text conditioning [B, 77, D] for one micro-batch
    state_dict()              the trained values, cloned on their device (snapshots, resume)
    load_state_dict(d)        put values back in place (a captured CUDA graph keeps addresses)
    write(d, step, out_dir)   the run's output files from a state_dict; returns their paths
    write_periodic(d, step, log_dir)   the every-N-steps copy
    preview_vectors(), slots  what previews sample with

EmbeddingTrainable trains N new token vectors [N, 768]: they replace the trigger word's N
prompt tokens inside the text encoder's input (vector_index), so gradients reach only them.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..embeddings import Embedding, EmbeddingError, init_vectors, read_embedding, save_pt, save_safetensors
from ..errors import ConfigError
from ..prompt import emphasize


class EmbeddingTrainable:
    kind = "embedding"

    def __init__(self, vectors: torch.Tensor, name: str = "embedding", *, model_hash: str | None = None,
                 model_name: str | None = None):
        # A tensor that requires grad is kept as is: an optimizer may already hold it, or a caller
        # differentiates through it. Anything else becomes a fresh fp32 Parameter.
        if not (vectors.requires_grad and vectors.dtype == torch.float32):
            vectors = torch.nn.Parameter(vectors.detach().to(torch.float32).clone())
        self.vectors = vectors                    # [N, D] fp32 master copy
        self.name, self.model_hash, self.model_name = name, model_hash, model_name

    @classmethod
    def for_run(cls, plan, model, device) -> "EmbeddingTrainable":
        """The run's vectors: from the resumable state, the --embedding file, or the init text's
        token embeddings (A1111's create_embedding)."""
        te = model.text_encoder
        width = te.config.width
        if plan.state is not None:
            init = plan.state["vectors"].float()
        elif plan.start is not None:
            init = plan.start.vectors.float()
        else:
            ids = model.tokenizer(plan.cfg.init_text, add_special_tokens=False)["input_ids"]
            init = init_vectors(te.token_table.detach().float().cpu(), ids, plan.cfg.vectors)
        if init.shape[1] != width:
            src = plan.state_path if plan.state is not None else plan.cfg.embedding
            raise ConfigError(f"{src}: vectors are {init.shape[1]} wide, the model needs {width} "
                              "(an embedding for another model family)")
        return cls(init.to(device), plan.name, model_hash=model.info.hash, model_name=model.info.name)

    # ------------------------------------------------------------------ in the model
    def parameters(self) -> list[torch.Tensor]:
        return [self.vectors]

    @property
    def slots(self) -> dict[str, int]:
        """{trigger word: vectors} for the prompt tokenizer."""
        return {self.name: int(self.vectors.shape[0])}

    def context(self, text_encoder, mb, clip_skip: int = 1) -> torch.Tensor:
        """Text encoding with the vectors placed where mb.vector_index points ([B, 77] long,
        -1 = the token table): [B, 77, D]."""
        ctx = text_encoder(mb.input_ids, clip_skip=clip_skip, vectors=self.vectors, vector_index=mb.vector_index)
        if mb.token_weight is not None:
            ctx = emphasize(ctx, mb.token_weight)
        return ctx

    def preview_vectors(self) -> torch.Tensor:
        return self.vectors.detach().clone()

    def before_micro_batch(self) -> None:
        """Called by the step before each micro-batch's forward (a hypernetwork advances its
        dropout there); nothing for an embedding."""

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {"vectors": self.vectors.detach().clone()}

    def load_state_dict(self, d: dict) -> None:
        with torch.no_grad():
            self.vectors.copy_(d["vectors"].to(self.vectors.device, torch.float32))

    # ------------------------------------------------------------------ files
    def embedding(self, d: dict, step: int, name: str | None = None) -> Embedding:
        return Embedding(name=name or self.name, vectors=d["vectors"].detach().float().cpu(), step=step,
                         sd_checkpoint=self.model_hash, sd_checkpoint_name=self.model_name, path=None)

    def output_paths(self, out_dir: Path) -> list[Path]:
        return [Path(out_dir) / f"{self.name}.pt", Path(out_dir) / f"{self.name}.safetensors"]

    def write(self, d: dict, step: int, out_dir: Path) -> list[Path]:
        """NAME.pt (A1111) then NAME.safetensors (kohya) from a state_dict."""
        emb = self.embedding(d, step)
        pt, st = self.output_paths(out_dir)
        return [save_pt(emb, pt), save_safetensors(emb, st)]

    def outputs_agree(self, d: dict, step: int, out_dir: Path) -> bool:
        """Do NAME.pt and NAME.safetensors both hold these vectors at this step? (A run killed
        between the two writes leaves them apart; resume rewrites both.)"""
        want = d["vectors"].detach().float().cpu()
        try:
            got = [read_embedding(p) for p in self.output_paths(out_dir)]
        except EmbeddingError:
            return False
        return all(e.step == step and torch.equal(e.vectors, want) for e in got)

    def periodic_name(self, step: int) -> str:
        """A1111 names every-N-steps copies and image embeddings NAME-STEP, inside and on disk."""
        return f"{self.name}-{step}"

    def write_periodic(self, d: dict, step: int, log_dir: Path) -> Path:
        """LOG/embeddings/NAME-STEP.pt (its name inside is NAME-STEP too)."""
        name = self.periodic_name(step)
        return save_pt(self.embedding(d, step, name), Path(log_dir) / "embeddings" / f"{name}.pt")


class EmbeddingGroup:
    """Several runs' embeddings as ONE conditioning (co-batched runs, GroupStep): their vectors
    concatenated [sum N_k, D]; a sub-batch's vector_index is shifted by `offsets[k]` for run k's
    rows (cobatch.py), so one text-encoder call places every run's vectors and each run's
    gradient lands in its own tensor."""

    kind = "embedding"

    def __init__(self, members: list[EmbeddingTrainable]):
        kinds = {getattr(m, "kind", None) for m in members}
        if kinds != {"embedding"}:
            raise ConfigError(f"runs of kinds {sorted(map(str, kinds))} cannot share a step: only embeddings co-batch")
        self.members = members
        self.offsets, n = [], 0
        for m in members:
            self.offsets.append(n)
            n += int(m.vectors.shape[0])

    def parameters(self) -> list[torch.Tensor]:
        return [m.vectors for m in self.members]

    def context(self, text_encoder, mb, clip_skip: int = 1) -> torch.Tensor:
        vectors = torch.cat([m.vectors for m in self.members])              # [sum N_k, D]
        ctx = text_encoder(mb.input_ids, clip_skip=clip_skip, vectors=vectors, vector_index=mb.vector_index)
        if mb.token_weight is not None:
            ctx = emphasize(ctx, mb.token_weight)
        return ctx
