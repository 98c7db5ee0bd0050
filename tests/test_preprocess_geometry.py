"""Preprocess geometry against the spec's formulas, written out here: split counts and offsets,
the auto-sized crop's choice per objective, the cover scale, A1111's entropy measure and window,
the weighted focal point, the plain fit's sizes. No OpenCV needed."""
from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from preprocess_helpers import outputs, position_image
from ti_fast.errors import ConfigError
from ti_fast.preprocessing import preprocess
from ti_fast.preprocessing.autosize import choose_size
from ti_fast.preprocessing.fit import fit_size, plain_fit
from ti_fast.preprocessing.focal import combine, cover_size, crop_box, entropy, entropy_point, focal_crop
from ti_fast.preprocessing.split import plan_split


def spec_split(w, h, W, H, threshold, o):
    """a1111-compat.md, "Split oversized", read literally: -> (along_y, L, T, offsets) or None."""
    if h > w:
        ratio, along_y, L, T = (w / h) / (W / H), True, h * W // w, H
    else:
        ratio, along_y, L, T = (h / w) / (H / W), False, w * H // h, W
    if not (ratio < 1 and ratio <= threshold):
        return None
    n = math.ceil((L - T * o) / (T * (1 - o)))
    return along_y, L, T, ([int(k * (L - T) / (n - 1)) for k in range(n)] if n > 1 else [0])


@pytest.mark.parametrize("w,h,W,H,thr,o,count", [
    (64, 200, 64, 64, 0.5, 0.2, 4),       # portrait: L=200, N=ceil(187.2/51.2)=4
    (64, 200, 64, 64, 0.5, 0.5, 6),       # more overlap, more tiles
    (64, 200, 64, 64, 0.5, 0.0, 4),       # no overlap: ceil(200/64)
    (256, 64, 64, 64, 0.5, 0.2, 5),       # landscape
    (128, 128, 64, 128, 0.5, 0.2, 3),     # square image, portrait target: tiles side by side
    (80, 64, 64, 64, 0.9, 0.2, 2),        # ratio 0.8 <= 0.9
    (400, 800, 512, 256, 0.5, 0.2, 5),    # portrait image, landscape target
])
def test_split_plan_matches_the_formula(w, h, W, H, thr, o, count):
    plan = plan_split(w, h, W, H, thr, o)
    along_y, L, T, offsets = spec_split(w, h, W, H, thr, o)
    assert len(offsets) == count
    assert plan.along_y == along_y and list(plan.offsets) == offsets
    assert plan.scaled == ((W, L) if along_y else (L, H))


def test_split_threshold_on_both_sides():
    assert plan_split(64, 256, 64, 64, threshold=0.25) is not None        # ratio 0.25 <= 0.25
    assert plan_split(64, 256, 64, 64, threshold=0.2499) is None
    # ratio 0.8 < 1 but above the threshold: not split (A1111's Extras script would split it)
    assert plan_split(80, 64, 64, 64, threshold=0.5) is None
    assert plan_split(64, 64, 64, 64, threshold=0.99) is None             # ratio 1
    assert plan_split(64, 60, 64, 64, threshold=0.99) is not None         # 0.9375


def test_split_one_tile():
    """L == T after flooring: N = 1, one tile at 0 (A1111 divides by zero here)."""
    assert spec_split(1000, 1001, 512, 512, 0.9995, 0.2)[3] == [0]
    plan = plan_split(1000, 1001, 512, 512, 0.9995, 0.2)
    assert plan.offsets == (0,) and plan.scaled == (512, 512)


@pytest.mark.parametrize("w,h,W,H", [(64, 200, 64, 64), (256, 64, 64, 64), (128, 128, 64, 128)])
def test_split_tiles_are_the_crops_at_the_offsets(tmp_path, w, h, W, H):
    """Sources already at the scaled size, so each written tile must equal the source's crop at
    the formula's offset pixel for pixel (position_image makes every pixel unique)."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    img = position_image(w, h)
    img.save(src / "img.png")
    preprocess(src, dst, width=W, height=H, split=True, quiet=True)
    along_y, L, T, offsets = spec_split(w, h, W, H, 0.5, 0.2)
    assert outputs(dst) == [f"00000-{k}-img.png" for k in range(len(offsets))]
    for k, off in enumerate(offsets):
        box = (0, off, W, off + H) if along_y else (off, 0, off + W, H)
        got = np.asarray(Image.open(dst / f"00000-{k}-img.png"))
        assert np.array_equal(got, np.asarray(img.crop(box))), (k, off)


def test_split_one_tile_written(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    Image.new("RGB", (1000, 1001), (10, 20, 30)).save(src / "x.png")
    res = preprocess(src, dst, split=True, split_threshold=0.9995, quiet=True)
    assert [(o.kind, o.size) for o in res.outputs] == [("split", (512, 512))]


@pytest.mark.parametrize("bad", [dict(split_threshold=1.0), dict(split_threshold=-0.1), dict(overlap=1.0),
                                 dict(overlap=-0.01)])
def test_split_settings_outside_unit_interval_refused(tmp_path, bad):
    (tmp_path / "src").mkdir()
    Image.new("RGB", (64, 64)).save(tmp_path / "src" / "x.png")
    with pytest.raises(ConfigError, match="--split-threshold|--overlap"):
        preprocess(tmp_path / "src", tmp_path / "dst", split=True, **bad)


def spec_autosize(iw, ih, lo=384, hi=768, amin=64 * 64, amax=640 * 640, objective="area", thr=0.1):
    """a1111-compat.md, "Auto-sized crop", read literally."""
    cands = []
    for w in range(lo, hi + 1, 64):
        for h in range(lo, hi + 1, 64):
            r = (iw / ih) / (w / h)
            err = 1 - min(r, 1 / r)
            if amin <= w * h <= amax and err <= thr:
                cands.append((w, h, err))
    if not cands:
        return None
    if objective == "area":
        best = max(w * h for w, h, _ in cands)
        tie = [c for c in cands if c[0] * c[1] == best]
        return min(tie, key=lambda c: c[2])[:2]
    best = min(c[2] for c in cands)
    tie = [c for c in cands if c[2] == best]
    return max(tie, key=lambda c: c[0] * c[1])[:2]


def test_autosize_choice_per_objective():
    # 4:3. Largest area within 640² and error 0.1: 704x576 (error 0.083); smallest error: 512x384 (0).
    assert choose_size(1000, 750, objective="area") == (704, 576)
    assert choose_size(1000, 750, objective="error") == (512, 384)
    assert choose_size(2000, 500) is None                      # 4:1, best candidate 2:1 has error 0.5
    for iw, ih in [(1000, 750), (750, 1000), (1920, 1080), (1080, 1920), (1000, 1000), (900, 500), (531, 977)]:
        for objective in ("area", "error"):
            for thr in (0.0, 0.05, 0.1, 0.3):
                kw = dict(objective=objective, thr=thr)
                assert choose_size(iw, ih, objective=objective, threshold=thr) == spec_autosize(iw, ih, **kw)
    assert choose_size(1000, 750, 256, 512, 100_000, 200_000) == spec_autosize(1000, 750, 256, 512, 100_000, 200_000)


def test_autosized_output_has_the_chosen_size(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    position_image(1000, 750).save(src / "a.png")
    position_image(2000, 500).save(src / "b.png")
    lines = []
    res = preprocess(src, dst, width=64, height=64, autosized_crop=True, objective="error", quiet=True,
                     warn=lines.append)
    assert [(o.source.name, o.kind, o.size) for o in res.outputs] == [("a.png", "autosized", (512, 384))]
    assert Image.open(dst / "00000-0-a.png").size == (512, 384)
    assert [s.reason for s in res.skipped] == ["no auto-sized crop"]
    assert len(lines) == 1 and "b.png" in lines[0] and "\n" not in lines[0]


def test_cover_scale_leaves_no_gap():
    assert cover_size(400, 300, 256, 64) == (256, 192)       # A1111 (by height): 85x64, a gap
    assert cover_size(300, 400, 256, 512) == (384, 512)      # A1111 (by width): 256x341, a gap
    assert cover_size(1000, 500, 512, 512) == (1024, 512)
    assert cover_size(500, 1000, 512, 512) == (512, 1024)
    for w, h, W, H in [(999, 333, 512, 512), (333, 999, 512, 768), (640, 480, 512, 256), (101, 97, 64, 128)]:
        sw, sh = cover_size(w, h, W, H)
        assert sw >= W and sh >= H and (sw == W or sh == H)
        assert abs(sw / sh - w / h) < 2 / min(sw, sh)


def test_a1111_entropy_measure():
    """-sum(log2 p) over the non-empty bins of the 1-bit window: 1/8 white -> 3 + log2(8/7)
    (Shannon's -sum(p log2 p) would be 0.544)."""
    a = np.zeros((16, 16), np.uint8)
    a[:2, :] = 255                                             # 32 of 256 pixels white
    assert entropy(Image.fromarray(a).convert("RGB")) == pytest.approx(3 + math.log2(8 / 7), abs=1e-12)
    a[:8, :] = 255
    assert entropy(Image.fromarray(a)) == pytest.approx(2.0)
    assert entropy(Image.new("RGB", (16, 16), (255, 255, 255))) == 0.0


def patch_image(w=512, h=128, x0=300, y0=16, size=96, seed=0):
    """Flat mid-grey with one bright textured patch (Pillow dithers grey 128 to about half white;
    the patch tips the window's 1-bit balance, which is what A1111's measure rewards). Every
    128-px window that holds the whole 96-px patch has its centre on the patch."""
    a = np.full((h, w, 3), 128, np.uint8)
    a[y0:y0 + size, x0:x0 + size] = np.random.RandomState(seed).randint(170, 256, (size, size, 1))
    return Image.fromarray(a)


def test_entropy_point_lands_on_the_patch():
    img = patch_image()
    x, y = entropy_point(img, 128, 128)
    assert 300 <= x < 396 and y == 64
    # the spec's window search, written out: every 4 px while the window fits, first best kept
    scores = []
    for left in range(0, 512 - 128 + 1, 4):
        bits = np.asarray(img.crop((left, 0, left + 128, 128)).convert("1"))
        p = np.array([bits.mean(), 1 - bits.mean()])
        scores.append(-np.log2(p[p > 0]).sum())
    assert x == 4 * int(np.argmax(scores)) + 64
    # portrait: the window slides along y (the dither, hence the first best, may differ)
    px, py = entropy_point(patch_image().transpose(Image.Transpose.TRANSPOSE), 128, 128)
    assert px == 64 and 300 <= py < 396
    assert entropy_point(Image.new("RGB", (256, 256), (128, 128, 128)), 128, 128) is None   # square


def test_focal_crop_without_opencv_kinds_keeps_the_patch():
    """Face and edge weights 0: only the entropy point (no OpenCV needed); the crop has the
    target size and contains the patch."""
    crop, focus, _ = focal_crop(patch_image(), 128, 128, face_weight=0, edges_weight=0)
    assert crop.size == (128, 128)
    x0, y0, x1, y1 = focus.box
    assert x0 <= 300 and 396 <= x1 and (y0, y1) == (0, 128)
    assert focus.weights == {"entropy": 1.0}
    crop, focus, _ = focal_crop(position_image(400, 300), 256, 64, face_weight=0, edges_weight=0)
    assert crop.size == (256, 64) and focus.scaled == (256, 192)     # covers the extreme target


def test_focal_point_weights_normalised_over_kinds_found():
    weights = {"faces": 0.9, "entropy": 0.15, "edges": 0.5}
    point, norm = combine({"faces": (100, 50), "edges": (10, 10)}, weights)
    assert norm == pytest.approx({"faces": 0.9 / 1.4, "edges": 0.5 / 1.4})
    assert point == (round((100 * 0.9 + 10 * 0.5) / 1.4), round((50 * 0.9 + 10 * 0.5) / 1.4)) == (68, 36)
    assert combine({"entropy": (7, 9)}, weights)[0] == (7, 9)
    assert crop_box((5, 5), (100, 50), 40, 40) == (0, 0, 40, 40)
    assert crop_box((95, 45), (100, 50), 40, 40) == (60, 10, 100, 50)
    assert crop_box((50, 25), (100, 50), 40, 40) == (30, 5, 70, 45)


def test_plain_fit_sizes():
    assert fit_size(1000, 500, 512, 512, "crop") == (512, 512)
    assert fit_size(1000, 500, 512, 512, "squash") == (512, 512)
    assert fit_size(1000, 500, 512, 512, "none") == (1000, 500)                  # A1111's keep size
    # buckets of 512x512: the 2:1 image falls in 640x384; scaled to just cover it, aspect kept
    assert fit_size(1000, 500, 512, 512, "crop", buckets=True) == (640, 384)
    assert fit_size(1000, 500, 512, 512, "none", buckets=True) == (768, 384)
    assert fit_size(300, 150, 512, 512, "none", buckets=True) == (300, 150)      # never upscaled
    assert plain_fit(position_image(1000, 500), 512, 512, "none", buckets=True).size == (768, 384)
    assert plain_fit(position_image(1000, 500), 512, 512, "squash").size == (512, 512)
