"""Embeddings inside PNG/WebP images: A1111's tEXt chunk and data-in-pixels encodings."""
import base64
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ti_fast.embeddings import (Embedding, EmbeddingError, embedding_to_png, read_embedding,
                                read_png_embedding, save_png_embedding)
from ti_fast.embeddings.png import (CHUNK_KEY, _from_json, _to_json, caption_overlay,
                                    default_caption, insert_data_in_pixels, lcg_keystream)

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
RICK = DATA / "a1111_test_embedding.png"
needs_rick = pytest.mark.skipif(not RICK.is_file(), reason=f"{RICK} not present")


def strip_chunks(src, dst, fmt="PNG", **kw):
    """Re-save pixels only, as an image host or editor would (no pnginfo)."""
    with Image.open(src) as im:
        Image.fromarray(np.asarray(im.convert("RGB"))).save(dst, format=fmt, **kw)
    with Image.open(dst) as im:
        assert CHUNK_KEY not in im.info and CHUNK_KEY not in getattr(im, "text", {})
    return dst


def make_emb(n=5, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    kw.setdefault("name", "pngtok")
    return Embedding(vectors=torch.randn(n, 768, generator=g) * 0.02, **kw)


def test_keystream_matches_a1111_reference():
    # Reference values from A1111's image_embedding.py self-test.
    ref = [253, 242, 127, 44, 157, 27, 239, 133, 38, 79, 167, 4, 177, 95, 130, 79, 78, 14, 52, 215]
    ks = lcg_keystream(100_100)
    assert ks[:20].tolist() == ref
    assert int(ks[100:].astype(np.int64).sum()) == 12731374


@needs_rick
def test_a1111_image_chunk_and_pixels(tmp_path):
    from_chunk = read_png_embedding(RICK)
    assert from_chunk.name == "rick" and from_chunk.step == 60
    assert from_chunk.vectors.shape == (8, 768) and from_chunk.vectors.dtype == torch.float32
    assert from_chunk.sd_checkpoint is None and from_chunk.path == RICK
    stripped = strip_chunks(RICK, tmp_path / "renamed.png")
    from_pixels = read_png_embedding(stripped)
    assert from_pixels.name == "rick" and from_pixels.step == 60  # stored name, not the stem
    assert torch.equal(from_pixels.vectors, from_chunk.vectors)
    assert torch.equal(read_embedding(stripped, width=768).vectors, from_chunk.vectors)


@needs_rick
def test_reencoding_rick_reproduces_a1111_pixels():
    """Our encoder on rick's data and A1111's captioned preview gives A1111's image: same
    payload bits, keystream and dot decoration. Only the padding after the zlib stream may
    differ (this file pads with zeros; A1111 v1.10.1 code pads cyclically; both decode)."""
    with Image.open(RICK) as im:
        arr = np.asarray(im.convert("RGB"))
        data = _from_json(base64.b64decode(im.text[CHUNK_KEY]))
    h, w_total = arr.shape[:2]
    bw = (w_total - 512 - 2) // 2
    preview = Image.fromarray(arr[:, bw + 1: bw + 1 + 512].copy())
    ours = np.asarray(insert_data_in_pixels(preview, data))
    assert ours.shape == arr.shape
    assert np.array_equal(ours[:, bw:w_total - bw], arr[:, bw:w_total - bw])  # separators + preview
    n_payload = len(zlib.compress(_to_json(data).encode(), level=9))
    in_payload = (np.arange(h * bw * 3) < n_payload).reshape(h, bw, 3)
    for ours_block, their_block in [(ours[:, :bw], arr[:, :bw]), (ours[:, -bw:], arr[:, -bw:])]:
        assert np.array_equal(ours_block & 0xF0, their_block & 0xF0)  # decoration
        assert np.array_equal((ours_block & 0x0F)[in_payload], (their_block & 0x0F)[in_payload])


@pytest.mark.parametrize("preview", [None, "noise"])
def test_our_png_round_trips_both_encodings(tmp_path, preview):
    emb = make_emb(step=1500, sd_checkpoint="6ce0161689", sd_checkpoint_name="v1-5-pruned-emaonly")
    if preview == "noise":
        rng = np.random.default_rng(0)
        preview = Image.fromarray(rng.integers(0, 256, (96, 80, 3), dtype=np.uint8))
    path = save_png_embedding(emb, tmp_path / "card.png", preview=preview)
    with Image.open(path) as im:
        h = 512 if preview is None else 96
        assert im.size[1] == h and CHUNK_KEY in im.text
    for source in [path, strip_chunks(path, tmp_path / "stripped.png")]:
        back = read_png_embedding(source)
        assert back.name == "pngtok"  # stored name, not the file stem
        assert (back.step, back.sd_checkpoint, back.sd_checkpoint_name) == \
            (1500, "6ce0161689", "v1-5-pruned-emaonly")
        assert torch.equal(back.vectors, emb.vectors)


def test_pixels_survive_lossless_webp(tmp_path):
    emb = make_emb(n=2, seed=3, step=10)
    save_png_embedding(emb, tmp_path / "card.png")
    webp = strip_chunks(tmp_path / "card.png", tmp_path / "card.webp", fmt="WEBP", lossless=True)
    assert torch.equal(read_embedding(webp).vectors, emb.vectors)


def test_layout_and_caption(tmp_path):
    emb = make_emb(n=8, step=60, sd_checkpoint="6ce0161689", sd_checkpoint_name="v1-5")
    assert default_caption(emb) == ("<pngtok>", ("v1-5", "[6ce0161689]", "8v 60s"))
    preview = Image.new("RGB", (256, 200), (128, 128, 128))
    img = np.asarray(embedding_to_png(emb, preview))
    bw = (img.shape[1] - 256 - 2) // 2
    assert img.shape[0] == 200 and img.shape[1] == 256 + 2 * bw + 2
    assert not img[:, bw].any() and not img[:, bw + 1 + 256].any()  # 1-px black separators
    card = np.asarray(caption_overlay(preview, "<pngtok>", ("v1-5", "[6ce0161689]", "8v 60s")))
    assert np.array_equal(img[:, bw + 1: bw + 1 + 256], card)
    assert card[0].max() <= 2                                   # gradient: top row black
    assert card[100, 128].max() < 128                           # middle darkened a little
    assert (card[8:60, :192] > 200).all(-1).any()               # white title, top-left
    assert not (card[60:150] > 200).all(-1).any()               # nothing drawn mid-image
    for x0, x1 in [(0, 85), (85, 171), (171, 256)]:             # three footers along the bottom
        assert (card[160:195, x0:x1] > 200).all(-1).any()


def test_images_without_embedding_and_damaged_ones(tmp_path):
    plain = Image.new("RGB", (32, 32), (90, 140, 200))
    plain.save(tmp_path / "plain.png")
    assert read_png_embedding(tmp_path / "plain.png") is None
    # Black columns look like separators; with no zlib stream behind them it is no embedding.
    arr = np.full((32, 32, 3), 77, dtype=np.uint8)
    arr[:, 5] = 0
    arr[:, 26] = 0
    Image.fromarray(arr).save(tmp_path / "bars.png")
    assert read_png_embedding(tmp_path / "bars.png") is None
    with pytest.raises(EmbeddingError, match=r"plain\.png: image carries no embedding"):
        read_embedding(tmp_path / "plain.png")
    from PIL import PngImagePlugin
    info = PngImagePlugin.PngInfo()
    info.add_text(CHUNK_KEY, "bm90IGpzb24=")  # base64 of "not json"
    plain.save(tmp_path / "bad.png", pnginfo=info)
    with pytest.raises(EmbeddingError, match=r"bad\.png: damaged sd-ti-embedding chunk"):
        read_png_embedding(tmp_path / "bad.png")
    (tmp_path / "trunc.png").write_bytes((tmp_path / "plain.png").read_bytes()[:40])
    with pytest.raises(EmbeddingError, match=r"trunc\.png: cannot read image"):
        read_png_embedding(tmp_path / "trunc.png")
