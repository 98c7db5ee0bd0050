"""CLIP ViT-L/14 text tower (the SD 1.x text encoder), after OpenAI CLIP / transformers' CLIPTextModel.

Attribute names mirror the checkpoint's `cond_stage_model.transformer.text_model.*` keys.
forward(input_ids [B, 77], clip_skip=1, vectors=None, vector_index=None) -> [B, 77, width].
Textual inversion enters through `vectors` [N, width] and `vector_index` [B, 77] (long, -1 =
keep the token table's row, i >= 0 = use vectors[i]): the frozen token table is never touched,
and shapes are static (CUDA-graph friendly).
"""
from __future__ import annotations

from dataclasses import dataclass, asdict

import torch
import torch.nn as nn

from .attention import attention_sdpa


@dataclass
class CLIPConfig:
    vocab_size: int = 49408       # token table rows (fine-tunes may enlarge it)
    width: int = 768              # hidden size = context width the UNet cross-attends to
    layers: int = 12
    heads: int = 12
    mlp: int = 3072
    max_positions: int = 77

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, d):
        return cls(**d)


class _Embeddings(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.position_embedding = nn.Embedding(cfg.max_positions, cfg.width)


class _SelfAttention(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        w = cfg.width
        self.heads = cfg.heads
        self.q_proj = nn.Linear(w, w)
        self.k_proj = nn.Linear(w, w)
        self.v_proj = nn.Linear(w, w)
        self.out_proj = nn.Linear(w, w)
        self.attn_fn = attention_sdpa

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = (p(x).view(b, t, self.heads, c // self.heads).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))           # [B, H, T, D]
        o = self.attn_fn(q, k, v, causal=True).transpose(1, 2).reshape(b, t, c)
        return self.out_proj(o)


class _MLP(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.width, cfg.mlp)
        self.fc2 = nn.Linear(cfg.mlp, cfg.width)

    def forward(self, x):
        h = self.fc1(x)
        return self.fc2(h * torch.sigmoid(1.702 * h))  # quick_gelu


class _Layer(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.self_attn = _SelfAttention(cfg)
        self.layer_norm1 = nn.LayerNorm(cfg.width)
        self.mlp = _MLP(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.width)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class _Encoder(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.layers = nn.ModuleList([_Layer(cfg) for _ in range(cfg.layers)])


class CLIPTextEncoder(nn.Module):
    def __init__(self, cfg: CLIPConfig = CLIPConfig()):
        super().__init__()
        self.config = cfg
        self.embeddings = _Embeddings(cfg)
        self.encoder = _Encoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.width)

    @property
    def dtype(self):
        return self.final_layer_norm.weight.dtype

    @property
    def token_table(self) -> torch.Tensor:
        """The frozen token embedding table [vocab, width]."""
        return self.embeddings.token_embedding.weight

    def embed(self, input_ids, vectors=None, vector_index=None):
        """Token + position embeddings [B, T, width], with trainable rows placed by vector_index."""
        tok = self.embeddings.token_embedding(input_ids)
        if vectors is not None:
            idx = vector_index.clamp(min=0)
            extra = vectors.to(tok.dtype)[idx]                              # [B, T, width]
            tok = torch.where((vector_index >= 0)[..., None], extra, tok)
        pos = self.embeddings.position_embedding.weight[: input_ids.shape[1]]
        return tok + pos[None]

    def forward(self, input_ids: torch.Tensor, clip_skip: int = 1, vectors=None, vector_index=None):
        """clip_skip (A1111 numbering, 1 = off): final LayerNorm of hidden_states[-clip_skip]."""
        if clip_skip < 1:
            raise ValueError(f"clip_skip must be >= 1 (A1111 numbering), got {clip_skip}")
        x = self.embed(input_ids, vectors, vector_index)
        n = max(1, len(self.encoder.layers) - (clip_skip - 1))
        for layer in self.encoder.layers[:n]:
            x = layer(x)
        return self.final_layer_norm(x)
