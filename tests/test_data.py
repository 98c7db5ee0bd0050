"""Training data: listing, decoding (EXIF, alpha, modes), captions, fitting, buckets, the
dataset and the batch order. Tiny images only (this runs on a CPU in well under a second)."""
import numpy as np
import pytest
import torch
from PIL import Image

from ti_fast.training.data import (BatchOrder, DataError, assign_bucket, caption_for, check_size,
                                fit_image, latent_weight, list_images, load_image, make_buckets,
                                prepare_dataset)

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def _px(img, x, y):
    return img.convert("RGB").getpixel((x, y))


def _close(a, b, tol=3):
    return all(abs(int(u) - int(v)) <= tol for u, v in zip(a, b))


# ----------------------------------------------------------------------------- listing

def test_list_images_filters_sorts_and_recurses(tmp_path):
    for name in ["b.PNG", "a.jpg", "c.JpEg", "d.webp", "e.bmp", "notes.txt", "f.gif", "._a.jpg"]:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "0.png").write_bytes(b"x")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "z.png").write_bytes(b"x")
    assert [p.name for p in list_images(tmp_path)] == ["a.jpg", "b.PNG", "c.JpEg", "d.webp", "e.bmp"]
    assert [p.relative_to(tmp_path).as_posix() for p in list_images(tmp_path, recursive=True)] == \
        ["a.jpg", "b.PNG", "c.JpEg", "d.webp", "e.bmp", "sub/0.png"]


def test_list_images_errors_name_the_folder(tmp_path):
    with pytest.raises(DataError, match="does not exist") as e:
        list_images(tmp_path / "nope")
    assert "nope" in str(e.value)
    f = tmp_path / "file.png"
    f.write_bytes(b"x")
    with pytest.raises(DataError, match="not a folder"):
        list_images(f)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "sub").mkdir()
    (tmp_path / "empty" / "sub" / "x.png").write_bytes(b"x")
    with pytest.raises(DataError, match="no images .*recursive"):
        list_images(tmp_path / "empty")
    assert len(list_images(tmp_path / "empty", recursive=True)) == 1


@pytest.mark.parametrize("w, h", [(500, 512), (512, 36), (0, 512), (512.0, 512)])
def test_check_size_rejects(w, h):
    with pytest.raises(DataError, match="multiple of 8"):
        check_size(w, h)


def test_check_size_accepts():
    check_size(512, 768)
    check_size(520, 64)


# ----------------------------------------------------------------------------- decoding

def test_exif_orientation_applied(tmp_path):
    img = Image.new("RGB", (40, 20), RED)
    img.paste(BLUE, (20, 0, 40, 20))                  # stored: red left half, blue right half
    exif = Image.Exif()
    exif[0x0112] = 6                                   # "rotate 90° clockwise to display"
    p = tmp_path / "rot.jpg"
    img.save(p, exif=exif, quality=95)
    rgb, alpha = load_image(p, alpha_weight=True)
    assert rgb.size == (20, 40) and rgb.mode == "RGB" and alpha is None
    assert _close(_px(rgb, 10, 5), RED, 40) and _close(_px(rgb, 10, 35), BLUE, 40)


def test_rgba_composited_on_white_and_alpha_weight(tmp_path):
    img = Image.new("RGBA", (8, 4), (255, 0, 0, 0))   # fully transparent red
    img.paste((0, 0, 255, 255), (4, 0, 8, 4))          # opaque blue right half
    img.putpixel((0, 0), (0, 0, 0, 128))               # half-transparent black
    p = tmp_path / "a.png"
    img.save(p)
    rgb, alpha = load_image(p, alpha_weight=False)
    assert alpha is None and rgb.mode == "RGB"
    assert _px(rgb, 1, 1) == WHITE and _px(rgb, 5, 1) == BLUE
    assert _close(_px(rgb, 0, 0), (127, 127, 127), 2)
    rgb, alpha = load_image(p, alpha_weight=True)
    assert alpha.dtype == np.float32 and alpha.shape == (4, 8)
    assert alpha[1, 1] == 0.0 and alpha[1, 5] == 1.0 and abs(alpha[0, 0] - 128 / 255) < 1e-6


def test_la_and_palette_transparency(tmp_path):
    la = Image.new("LA", (4, 4), (0, 0))
    la.putpixel((1, 1), (50, 255))
    la.save(tmp_path / "la.png")
    rgb, alpha = load_image(tmp_path / "la.png", True)
    assert _px(rgb, 0, 0) == WHITE and _px(rgb, 1, 1) == (50, 50, 50) and alpha[1, 1] == 1.0
    pal = Image.new("P", (4, 4), 0)
    pal.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    pal.putpixel((2, 2), 1)
    pal.save(tmp_path / "p.png", transparency=0)      # palette index 0 (red) is transparent
    rgb, alpha = load_image(tmp_path / "p.png", True)
    assert _px(rgb, 0, 0) == WHITE and _px(rgb, 2, 2) == GREEN
    assert alpha[0, 0] == 0.0 and alpha[2, 2] == 1.0


def test_modes_to_rgb(tmp_path):
    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    pal.save(tmp_path / "pal.png")
    Image.new("L", (4, 4), 77).save(tmp_path / "grey.png")
    Image.new("CMYK", (4, 4), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=100)
    Image.fromarray(np.full((4, 4), 65535, np.uint16)).save(tmp_path / "g16.png")
    expect = {"pal.png": (10, 200, 30), "grey.png": (77, 77, 77), "cmyk.jpg": RED,
              "g16.png": WHITE}
    for name, colour in expect.items():
        rgb, alpha = load_image(tmp_path / name, alpha_weight=True)
        assert rgb.mode == "RGB" and alpha is None, name
        assert _close(_px(rgb, 1, 1), colour, 4), (name, _px(rgb, 1, 1))
    Image.fromarray(np.full((4, 4), 257 * 100, np.uint16)).save(tmp_path / "g16b.png")
    assert _close(_px(load_image(tmp_path / "g16b.png")[0], 0, 0), (100, 100, 100), 1)


def test_unreadable_image_raises_naming_file(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(DataError, match="broken.png"):
        load_image(bad)
    Image.new("RGB", (64, 64), RED).save(tmp_path / "trunc.jpg")
    data = (tmp_path / "trunc.jpg").read_bytes()
    (tmp_path / "trunc.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="trunc.jpg"):
        load_image(tmp_path / "trunc.jpg")


# ----------------------------------------------------------------------------- captions

def test_caption_from_txt_and_stem(tmp_path):
    p = tmp_path / "001-a red car.png"
    assert caption_for(p) == "a red car"
    assert caption_for(tmp_path / "12 - 3 blue.jpg") == "- 3 blue"   # A1111's ^[-\d]+\s* exactly
    assert caption_for(tmp_path / "-7-x 1.jpg") == "x 1"
    (tmp_path / "001-a red car.txt").write_text("\ufeff  zork, red car\n on grass \n", encoding="utf-8")
    assert caption_for(p) == "zork, red car\n on grass"
    assert caption_for(tmp_path / "03_big_dog.png", word_regex=r"[a-z]+", join=" ") == "big dog"


# ----------------------------------------------------------------------------- fitting

def _stripes(w, h):
    """Left quarter red, middle half green, right quarter blue."""
    img = Image.new("RGB", (w, h), GREEN)
    img.paste(RED, (0, 0, w // 4, h))
    img.paste(BLUE, (w - w // 4, 0, w, h))
    return img


def test_fit_crop_vs_squash():
    img = _stripes(200, 100)
    x, wgt = fit_image(img, None, 64, 32, "crop")     # same aspect: nothing cropped
    assert x.shape == (3, 32, 64) and x.dtype == torch.float32 and wgt is None
    assert x.min() >= -1 and x.max() <= 1
    x, _ = fit_image(img, None, 64, 64, "crop")       # centre 100×100: green only
    assert x.shape == (3, 64, 64)                     # (Lanczos reads a little past the box edge)
    assert torch.allclose(x[:, :, 0], torch.tensor([-1.0, 1.0, -1.0])[:, None], atol=0.1)
    x, _ = fit_image(img, None, 64, 64, "squash")     # whole width: red at the left
    assert torch.allclose(x[:, :, 0], torch.tensor([1.0, -1.0, -1.0])[:, None], atol=0.05)
    tall = Image.new("RGB", (50, 200), GREEN)
    tall.paste(RED, (0, 0, 50, 80))                   # red rows 0..79 of 200
    x, _ = fit_image(tall, None, 64, 128, "crop")     # keeps source rows 50..150: row 0 is red
    assert x.shape == (3, 128, 64)
    assert torch.allclose(x[:, 0, 0], torch.tensor([1.0, -1.0, -1.0]), atol=0.1)
    assert torch.allclose(x[:, 60, 0], torch.tensor([-1.0, 1.0, -1.0]), atol=0.1)  # source row 97
    assert torch.allclose(x[:, 45, 0], torch.tensor([-1.0, 1.0, -1.0]), atol=0.1)  # source row 85
    x, _ = fit_image(tall, None, 64, 128, "squash")   # whole height: row r shows source row 1.5625 r
    assert torch.allclose(x[:, 45, 0], torch.tensor([1.0, -1.0, -1.0]), atol=0.1)  # source row 71
    with pytest.raises(DataError, match="resize mode"):
        fit_image(img, None, 64, 64, "pad")


def test_fit_weight_follows_crop_and_latent_weight():
    img = Image.new("RGB", (200, 100), WHITE)
    alpha = np.zeros((100, 200), np.float32)
    alpha[:, 100:] = 1.0                               # right half opaque
    x, w = fit_image(img, alpha, 64, 64, "crop")
    assert w.shape == (64, 64) and w.min() >= 0 and w.max() <= 1
    assert w[:, :28].max() < 0.05 and w[:, 36:].min() > 0.95
    lw = latent_weight(torch.stack([w, torch.ones(64, 64)]))
    assert lw.shape == (2, 8, 8)
    assert torch.allclose(lw.mean(dim=(1, 2)), torch.ones(2), atol=1e-5)
    assert lw[0, :, 0].max() < 0.1 and lw[1].eq(1).all()


# ----------------------------------------------------------------------------- buckets

def test_make_buckets():
    bs = make_buckets(512, 768)
    assert (512, 768) in bs and (768, 512) in bs
    for w, h in bs:
        if (w, h) != (512, 768):
            assert w % 64 == 0 and h % 64 == 0
        assert w * h <= 512 * 768 and max(w, h) / min(w, h) <= 2.0
        assert (h, w) in bs
    assert make_buckets(512, 512) == [(384, 640), (448, 576), (512, 512), (576, 448), (640, 384)]
    assert assign_bucket(1000, 1000, bs) in {(576, 640), (640, 576)}
    assert assign_bucket(3000, 1000, bs) == max(bs, key=lambda b: b[0] / b[1])
    assert assign_bucket(600, 900, bs) == (512, 768)


# ----------------------------------------------------------------------------- dataset

def _write_set(d):
    d.mkdir()
    _stripes(200, 70).save(d / "01-wide thing.png")
    Image.new("RGB", (60, 180), RED).save(d / "02-tall.jpg")
    Image.new("RGB", (100, 100), BLUE).save(d / "03-square.webp")
    rgba = Image.new("RGBA", (100, 100), (0, 0, 0, 0))
    rgba.paste((0, 255, 0, 255), (0, 0, 50, 100))
    rgba.save(d / "04-cutout.png")
    (d / "04-cutout.txt").write_text("zork, cutout")
    (d / "05-broken.png").write_bytes(b"garbage")
    return d


def test_prepare_dataset_buckets_flip_weights(tmp_path):
    d = _write_set(tmp_path / "data")
    warnings = []
    ds = prepare_dataset(d, width=128, height=128, resize="crop", buckets=True, flip=True,
                         alpha_weight=True, warn=warnings.append, max_ratio=3.0)
    assert len(warnings) == 1 and "05-broken.png" in warnings[0]
    assert [p.name for p, _ in ds.skipped] == ["05-broken.png"]
    assert [it.caption for it in ds] == ["wide thing", "tall", "square", "zork, cutout"]
    assert ds.bucket_sizes == [(192, 64), (64, 192), (128, 128), (128, 128)]
    assert ds.bucket_counts() == {(64, 192): 1, (128, 128): 2, (192, 64): 1}
    for it in ds:
        w, h = it.size
        assert it.image.shape == (3, h, w) and it.pixels.dtype == torch.uint8
        assert torch.equal(it.image_flipped, it.image.flip(-1))
        assert it.weight.shape == (h, w)
        assert len(it.views()) == 2
    cut = ds[3]
    assert cut.weight[:, :60].min() > 0.95 and cut.weight[:, 68:].max() < 0.05
    assert torch.equal(cut.weight_flipped, cut.weight.flip(-1))
    assert ds[2].weight.eq(1).all()                    # opaque image: uniform weight
    # without flip / alpha_weight: no mirror, no weights; squash keeps the stripes' red edge
    ds = prepare_dataset(d, width=64, height=64, resize="squash", buckets=False, flip=False,
                         alpha_weight=False, warn=lambda m: None)
    assert all(it.size == (64, 64) and it.weight is None and it.image_flipped is None for it in ds)
    assert len(ds[0].views()) == 1 and ds[0].image[0, 0, 0] > 0.9


def test_prepare_dataset_errors(tmp_path):
    with pytest.raises(DataError, match="multiple of 8"):
        prepare_dataset(tmp_path / "missing", width=100, height=128)   # size checked first
    d = tmp_path / "bad"
    d.mkdir()
    (d / "a.png").write_bytes(b"nope")
    (d / "b.jpg").write_bytes(b"")
    warnings = []
    with pytest.raises(DataError, match="none of the 2 images"):
        prepare_dataset(d, width=64, height=64, warn=warnings.append)
    assert len(warnings) == 2
    Image.new("RGBA", (8, 8), (0, 0, 0, 0)).save(d / "clear.png")
    with pytest.raises(DataError):
        prepare_dataset(d, width=64, height=64, alpha_weight=True, warn=warnings.append)
    assert "fully transparent" in warnings[-1]


# ----------------------------------------------------------------------------- batch order

SIZES = [(64, 64)] * 7 + [(128, 64)] * 3 + [(64, 128)]   # buckets of 7, 3 and 1 items


def test_batches_stay_in_one_bucket_and_cover_epoch():
    order = BatchOrder(SIZES, batch_size=2, seed=3)
    assert order.steps_per_epoch == 4 + 2 + 1
    for epoch in range(3):
        batches = order.epoch_batches(epoch)
        assert len(batches) == order.steps_per_epoch
        assert all(len(b) == 2 and len({SIZES[i] for i in b}) == 1 for b in batches)
        assert set().union(*map(set, batches)) == set(range(len(SIZES)))
        for b in batches:                            # no repeats unless the bucket is too small
            if SIZES[b[0]] != (64, 128):
                assert len(set(b)) == 2
    assert order.epoch_batches(0) != order.epoch_batches(1)


def test_order_reproducible_and_resumable():
    a = BatchOrder(SIZES, 3, seed=11)
    first = [a.next_batch() for _ in range(10)]
    assert a.steps_per_epoch == 5 and (a.epoch, a.position) == (1, 5)   # crossed an epoch
    assert [b for b, _ in zip(BatchOrder(SIZES, 3, seed=11), range(10))] == first
    assert first != [BatchOrder(SIZES, 3, seed=12).next_batch() for _ in range(10)]
    state = a.state_dict()
    rest = [a.next_batch() for _ in range(10)]
    b = BatchOrder(SIZES, 3, seed=11)
    assert b.load_state_dict(state) is True
    assert [b.next_batch() for _ in range(10)] == rest
    assert (b.epoch, b.position) == (a.epoch, a.position)
    # changed batch size: the old position means nothing -> next epoch from its start
    c = BatchOrder(SIZES, 2, seed=11)
    assert c.load_state_dict(state) is False
    assert (c.epoch, c.position) == (state["epoch"] + 1, 0)


def test_batch_larger_than_bucket_wraps():
    order = BatchOrder([(64, 64)] * 2, batch_size=5, seed=0)
    (batch,) = order.epoch_batches(0)
    assert len(batch) == 5 and sorted(set(batch)) == [0, 1]
    assert batch == [batch[0], batch[1]] * 2 + [batch[0]]
    with pytest.raises(ValueError):
        BatchOrder([(64, 64)], batch_size=0, seed=0)
