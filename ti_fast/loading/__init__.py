"""Checkpoint formats, key rules, variant detection, tokenizer resolution, hashes, tiny models.

  errors.py     ModelLoadError, the one-line refusal
  files.py      reading .safetensors/.ckpt/.bin safely, tensor by tensor; RssAnon measurement
  keys.py       original <-> diffusers key rules (any depth)
  configs.py    our configs <-> diffusers/transformers config.json
  detect.py     SD 1.x / inpainting, or refuse (SDXL, SD 2.x, v-pred, pix2pix, not a model)
  tokenizer.py  CLIP tokenizer: from OpenAI's BPE file, the tiny one, resolution order
  tokens.py     the token-embedding table alone, read without the model (create, inspect --model)
  hashes.py     A1111 model hashes, cached by (path, size, mtime)
  tiny.py       make_tiny and the tiny configs
  loader.py     load_model -> SDModel(unet, vae, text_encoder, tokenizer, info)
"""
from .errors import ModelLoadError
from .files import open_weights, peak_rss_anon_while, rss_anon, cache_dir
from .loader import load_model, SDModel, ModelInfo
from .tiny import make_tiny, tiny_models, TINY_UNET, TINY_VAE, TINY_CLIP, TINY_VOCAB_SIZE
from .tokenizer import build_tokenizer_from_bpe, resolve_tokenizer
from .tokens import TokenTable, read_token_table
from .hashes import file_hashes, folder_sha256

__all__ = ["ModelLoadError", "open_weights", "peak_rss_anon_while", "rss_anon", "cache_dir",
           "load_model", "SDModel", "ModelInfo", "make_tiny", "tiny_models", "TINY_UNET", "TINY_VAE",
           "TINY_CLIP", "TINY_VOCAB_SIZE", "build_tokenizer_from_bpe", "resolve_tokenizer", "TokenTable",
           "read_token_table", "file_hashes", "folder_sha256"]
