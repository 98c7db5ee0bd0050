"""Embedding files: read every format users have, write A1111 .pt, kohya .safetensors and
PNG-embedded embeddings; load a folder as a trigger-word library; create new embeddings.

    formats.py  Embedding, errors, .pt/.bin/.safetensors read + save_pt/save_safetensors
    png.py      both PNG encodings (tEXt chunk, data in pixels) and the caption overlay
    library.py  read_embedding (any file) and load_library (folders)
    create.py   sanitize_name, init_vectors, create_embedding, create_embedding_file (ti-fast create)
"""
from ti_fast.embeddings.create import (MAX_VECTORS, create_embedding, create_embedding_file, init_vectors,
                                       sanitize_name)
from ti_fast.embeddings.formats import (Embedding, EmbeddingError, WrongModelEmbedding,
                                        embedding_to_a1111_dict, save_pt, save_safetensors)
from ti_fast.embeddings.library import load_library, read_embedding
from ti_fast.embeddings.png import (embedding_to_png, read_png_embedding, save_png_embedding)

__all__ = [
    "Embedding", "EmbeddingError", "WrongModelEmbedding", "MAX_VECTORS",
    "read_embedding", "load_library", "save_pt", "save_safetensors", "embedding_to_a1111_dict",
    "embedding_to_png", "save_png_embedding", "read_png_embedding",
    "sanitize_name", "init_vectors", "create_embedding", "create_embedding_file",
]
