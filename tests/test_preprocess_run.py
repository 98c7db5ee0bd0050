"""A preprocess run end to end: output names, flipped copies, captions, duplicates, transparency,
EXIF, --dry-run, SRC left untouched, and the output training directly on the tiny model."""
from __future__ import annotations

import io
import shutil

import numpy as np
import pytest
from PIL import Image, ImageDraw

from preprocess_helpers import need, noise, outputs, position_image, tree_state
from ti_fast.preprocessing import preprocess
from ti_fast.preprocessing.dedupe import hamming, phash, phash_bits


def run(src, dst, **kw):
    lines = []
    res = preprocess(src, dst, quiet=True, warn=lines.append, say=lines.append, **kw)
    return res, lines


def test_names_flips_and_captions(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    position_image(96, 64).save(src / "003-a red car.png")
    position_image(64, 64).save(src / "b.jpg", quality=95)
    (src / "b.txt").write_text("  zork, a blue boat\n", encoding="utf-8")
    res, _ = run(src, dst, width=64, height=64, flip=True, caption_prefix="photo of ", caption_suffix=", sharp")
    assert outputs(dst) == ["00000-0-003-a red car.png", "00000-1-003-a red car.png",
                            "00001-0-b.png", "00001-1-b.png"]
    assert [(o.kind, o.flipped) for o in res.outputs] == [("fit", False), ("fit", True)] * 2
    a = np.asarray(Image.open(dst / "00000-0-003-a red car.png"))
    assert np.array_equal(np.asarray(Image.open(dst / "00000-1-003-a red car.png")), a[:, ::-1])
    # crop fit: the centre 64x64 of the 96x64 source, unresampled (scale 1)
    assert np.array_equal(a, np.asarray(position_image(96, 64).crop((16, 0, 80, 64))))
    for k in (0, 1):
        assert (dst / f"00000-{k}-003-a red car.txt").read_text(encoding="utf-8") == "photo of a red car, sharp"
        assert (dst / f"00001-{k}-b.txt").read_text(encoding="utf-8") == "photo of zork, a blue boat, sharp"


def test_caption_regex_and_join(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    noise(64, 64).save(src / "12-big_dog_on-grass.png")
    run(src, dst, width=64, height=64, filename_regex=r"[a-z]+", join=", ")
    assert (dst / "00000-0-12-big_dog_on-grass.txt").read_text() == "big, dog, on, grass"


def test_index_counts_every_image_file(tmp_path):
    """An unreadable image keeps its number, so the others keep their names."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    noise(64, 64).save(src / "a.png")
    (src / "b.png").write_bytes(b"not a png")
    noise(64, 64, 1).save(src / "c.png")
    res, lines = run(src, dst, width=64, height=64)
    assert outputs(dst) == ["00000-0-a.png", "00002-0-c.png"]
    assert [(s.path.name, s.reason) for s in res.skipped] == [("b.png", "unreadable")]
    assert len(lines) == 1 and "b.png" in lines[0]


def test_dry_run_writes_nothing(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    position_image(64, 200).save(src / "t.png")
    res, lines = run(src, dst, width=64, height=64, split=True, flip=True, dry_run=True)
    assert not dst.exists()
    assert len(res.outputs) == 8 and len(lines) == 8
    assert lines[0].startswith("would write ") and "00000-0-t.png (64x64, split)" in lines[0]
    assert "flipped" in lines[1]


def reference_phash_bits(img: Image.Image) -> np.ndarray:
    """The common pHash as the imagehash package computes it, with scipy's DCT."""
    fftpack = need("scipy.fftpack", "pip install scikit-image (brings scipy)")
    px = np.asarray(img.convert("L").resize((32, 32), Image.Resampling.LANCZOS))
    dct = fftpack.dct(fftpack.dct(px, axis=0), axis=1)
    low = dct[:8, :8]
    return low > np.median(low)


def scene(seed: int, size=(160, 120)) -> Image.Image:
    """A smooth synthetic picture: a gradient and a few shapes placed by the seed."""
    rng = np.random.RandomState(seed)
    y, x = np.mgrid[0:size[1], 0:size[0]]
    base = np.stack([x * 255 // size[0], y * 255 // size[1], np.full_like(x, rng.randint(256))], -1)
    img = Image.fromarray(base.astype(np.uint8))
    d = ImageDraw.Draw(img)
    for _ in range(4):
        x0, y0 = rng.randint(0, size[0] - 40), rng.randint(0, size[1] - 40)
        d.ellipse([x0, y0, x0 + rng.randint(15, 40), y0 + rng.randint(15, 40)], fill=tuple(rng.randint(0, 256, 3)))
    return img


def test_phash_matches_the_reference():
    for seed in range(6):
        img = scene(seed)
        assert np.array_equal(phash_bits(img), reference_phash_bits(img)), seed


def test_duplicates_reported_and_skipped(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    a = scene(0)
    a.save(src / "a.png")
    shutil.copyfile(src / "a.png", src / "b-copy.png")                        # exact
    buf = io.BytesIO()
    a.resize((128, 96), Image.Resampling.BICUBIC).save(buf, format="JPEG", quality=80)
    (src / "c-small.jpg").write_bytes(buf.getvalue())                           # near
    scene(1).save(src / "d-other.png")
    assert hamming(phash(a), phash(Image.open(src / "c-small.jpg"))) <= 4
    assert hamming(phash(a), phash(scene(1))) > 10

    res, lines = run(src, tmp_path / "keep", width=64, height=64)
    assert [(d.path.name, d.of.name, d.exact, d.skipped) for d in res.duplicates] == [
        ("b-copy.png", "a.png", True, False), ("c-small.jpg", "a.png", False, False)]
    assert len(res.outputs) == 4 and len(lines) == 2
    res, lines = run(src, tmp_path / "dedupe", width=64, height=64, dedupe=True)
    assert [o.source.name for o in res.outputs] == ["a.png", "d-other.png"]
    assert [(s.path.name, s.reason) for s in res.skipped] == [("b-copy.png", "duplicate"), ("c-small.jpg", "duplicate")]
    assert "near duplicate" in lines[1] and "a.png" in lines[1] and "skipped" in lines[1]
    near = hamming(phash(a), phash(Image.open(src / "c-small.jpg")))
    res, _ = run(src, tmp_path / "strict", width=64, height=64, dedupe=True, dedupe_distance=0)
    assert [s.path.name for s in res.skipped] == ["b-copy.png"] + (["c-small.jpg"] if near == 0 else [])


def test_transparency_white_or_kept(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:, 32:, 3] = 255                      # left half fully transparent (stored colour: red)
    Image.fromarray(rgba, "RGBA").save(src / "t.png")
    run(src, tmp_path / "white", width=64, height=64)
    out = Image.open(tmp_path / "white" / "00000-0-t.png")
    assert out.mode == "RGB" and out.getpixel((5, 5)) == (255, 255, 255) and out.getpixel((50, 5)) == (200, 0, 0)
    run(src, tmp_path / "alpha", width=64, height=64, keep_alpha=True, flip=True)
    out = Image.open(tmp_path / "alpha" / "00000-1-t.png")          # the flipped copy
    assert out.mode == "RGBA" and out.getpixel((5, 5)) == (200, 0, 0, 255) and out.getpixel((50, 5))[3] == 0


def test_exif_orientation_applied(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    img = Image.new("RGB", (80, 40), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6                           # stored landscape, shown rotated 90° clockwise
    img.save(src / "r.jpg", exif=exif)
    res, _ = run(src, tmp_path / "dst", width=64, height=64, fit="none")
    assert res.outputs[0].size == (40, 80)


def test_source_folder_never_modified(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    position_image(64, 200).save(src / "tall.png")
    scene(0).save(src / "a.png")
    shutil.copyfile(src / "a.png", src / "a2.png")
    (src / "tall.txt").write_text("a tall one")
    (src / "notes.md").write_text("x")
    (src / "sub").mkdir()
    noise(70, 70).save(src / "sub" / "deep.png")
    before = tree_state(src)
    run(src, tmp_path / "dst", width=64, height=64, split=True, flip=True, autosized_crop=True, min_size=64,
        max_size=128, error_threshold=0.5, dedupe=True, focal_crop=False)
    run(src, tmp_path / "dst2", width=64, height=64, fit="none", buckets=True, keep_alpha=True)
    assert tree_state(src) == before


def test_output_trains_directly(tmp_path, tiny_single):
    """Preprocess the demo images (flip, captions), then train two steps on the output."""
    from train_helpers import images, quick_config
    from ti_fast import train
    from ti_fast.training.data import prepare_dataset
    dst = tmp_path / "prepared"
    res, _ = run(images(tmp_path), dst, width=64, height=64, flip=True, caption_prefix="tok, ")
    ds = prepare_dataset(dst, width=64, height=64)
    assert len(ds) == len(res.outputs) == 8
    assert sorted(it.caption for it in ds) == sorted(o.caption for o in res.outputs)
    assert all(it.caption.startswith("tok, orange ring on ") for it in ds)
    cfg = quick_config(tiny_single, tmp_path, data=str(dst), steps=2, template="subject_filewords")
    r = train(cfg)
    assert r.status == "completed" and r.steps == 2 and np.isfinite(r.final_loss)


@pytest.mark.parametrize("fit", ["crop", "squash"])
def test_plain_fit_gives_the_trainers_pixels(tmp_path, fit):
    """The trainer fitting a raw image and fitting its preprocessed copy see the same pixels."""
    from ti_fast.training.data import prepare_dataset
    src = tmp_path / "src"
    src.mkdir()
    scene(3, (200, 120)).save(src / "s.png")
    run(src, tmp_path / "dst", width=64, height=96, fit=fit)
    raw = prepare_dataset(src, width=64, height=96, resize=fit)[0].pixels
    pre = prepare_dataset(tmp_path / "dst", width=64, height=96, resize=fit)[0].pixels
    assert (raw.int() - pre.int()).abs().max().item() == 0
