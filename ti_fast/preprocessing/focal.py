"""Auto focal-point crop: scale to cover the target, find the focal point, cut the window around it.

After A1111's modules/textual_inversion/autocrop.py (facts in ../shared/spec/a1111-compat.md,
"Preprocessing"). The focal point is the weighted mean of up to three centroids, weights
normalised over the kinds that found something:
  faces    (--face-weight, 0.9)      Haar cascades, see opencv.py
  entropy  (--entropy-weight, 0.15)  the centre of the target-sized window of highest "entropy"
  edges    (--edges-weight, 0.5)     the centroid of up to 100 corner points, see opencv.py
A kind whose weight is 0 is not computed. No point at all -> the centre (a centre crop).

Differences from A1111, on purpose:
- Scale: max(W/w, H/h), so the image always covers W×H. A1111 scales landscape images by height
  and portrait ones by width, which leaves a gap when the target's aspect is more extreme.
- Entropy windows slide along the axis that is longer than the target (with A1111's scale that is
  always the image's long side) and include the last window flush with the edge when it falls on
  the 4-px grid; A1111 stops one step short (`while right < long side`).
A1111's "entropy" itself is kept exactly: the window converted to 1 bit (Pillow's convert('1'),
Floyd-Steinberg dithered), then -sum(log2 p) over the non-empty bins. It is not Shannon's
-sum(p log2 p): it grows as one colour gets rarer, so it finds the window whose black/white
balance is most lopsided. A square image gets no entropy point; the first best window is kept.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

from .fit import resize

ENTROPY_STEP = 4                 # px between entropy windows
GREEN, BLUE, YELLOW, RED = "#0F0", "#00F", "#FF0", "#F00"
COLOURS = {"edges": BLUE, "entropy": YELLOW, "faces": RED}


@dataclass
class Focus:
    """What the focal crop found, in the coordinates of the scaled image."""
    scaled: tuple[int, int]                              # (w, h) of the image after the cover scale
    point: tuple[int, int]                               # the focal point
    box: tuple[int, int, int, int]                       # the crop (left, top, right, bottom)
    points: dict[str, list] = field(default_factory=dict)      # kind -> [(x, y)] found
    weights: dict[str, float] = field(default_factory=dict)    # kind -> normalised weight


def cover_size(w: int, h: int, W: int, H: int) -> tuple[int, int]:
    """(w', h'): the image scaled by max(W/w, H/h), so that it covers W×H (never short by rounding)."""
    if w * H >= W * h:               # relatively wider than the target: the height decides
        return max(W, round(w * H / h)), H
    return W, max(H, round(h * W / w))


def entropy(window: Image.Image) -> float:
    """A1111's window "entropy": -sum(log2 p) over the non-empty bins of the 1-bit image."""
    bits = np.asarray(window.convert("1"), dtype=np.uint8)              # [h, w] of 0/1
    counts = np.bincount(bits.ravel(), minlength=2)
    p = counts[counts > 0] / bits.size
    return float(-np.log2(p).sum())


def entropy_point(img: Image.Image, W: int, H: int) -> tuple[int, int] | None:
    """Centre of the W×H window of highest entropy, slid in 4-px steps along the axis where the
    image is longer than the window (first best kept); None for a square image."""
    w, h = img.size
    if w == h:
        return None
    along_x = w - W > h - H
    span = (w - W) if along_x else (h - H)
    best, best_e = 0, 0.0
    for pos in range(0, max(span, 0) + 1, ENTROPY_STEP):
        box = (pos, 0, pos + W, H) if along_x else (0, pos, W, pos + H)
        e = entropy(img.crop(box))
        if e > best_e:                                   # strictly greater: the first best stays
            best, best_e = pos, e
    return (int(best + W / 2), int(H / 2)) if along_x else (int(W / 2), int(best + H / 2))


def centroid(points: list[tuple[float, float]]) -> tuple[float, float]:
    return (sum(p[0] for p in points) / len(points), sum(p[1] for p in points) / len(points))


def combine(centroids: dict[str, tuple[float, float]], weights: dict[str, float]) -> tuple[tuple[int, int], dict]:
    """Weighted mean of the centroids found, weights normalised over those kinds, rounded as A1111
    does (Python's round). -> (point, normalised weights); ((-1, -1), {}) when nothing was found."""
    total = sum(weights[k] for k in centroids)
    if not centroids or total <= 0:
        return (-1, -1), {}
    norm = {k: weights[k] / total for k in centroids}
    x = sum(c[0] * norm[k] for k, c in centroids.items())
    y = sum(c[1] * norm[k] for k, c in centroids.items())
    s = sum(norm.values())
    return (round(x / s), round(y / s)), norm


def crop_box(point: tuple[int, int], size: tuple[int, int], W: int, H: int) -> tuple[int, int, int, int]:
    """The W×H window centred on `point`, moved back inside the w×h image."""
    w, h = size
    x = min(max(point[0] - W // 2, 0), w - W)
    y = min(max(point[1] - H // 2, 0), h - H)
    return (x, y, x + W, y + H)


def find_focus(rgb: Image.Image, W: int, H: int, face_weight: float = 0.9, entropy_weight: float = 0.15,
               edges_weight: float = 0.5) -> Focus:
    """The focal point and crop box of an RGB image already scaled to cover W×H."""
    weights = {"faces": face_weight, "entropy": entropy_weight, "edges": edges_weight}
    points: dict[str, list] = {}
    if face_weight > 0:
        from .opencv import face_points
        points["faces"] = face_points(rgb)
    if entropy_weight > 0:
        e = entropy_point(rgb, W, H)
        points["entropy"] = [e] if e is not None else []
    if edges_weight > 0:
        from .opencv import corner_points
        points["edges"] = corner_points(rgb)
    found = {k: centroid(v) for k, v in points.items() if v}
    point, norm = combine(found, weights)
    if point == (-1, -1):
        point = (rgb.width // 2, rgb.height // 2)
    return Focus(rgb.size, point, crop_box(point, rgb.size, W, H), points, norm)


def draw_debug(rgb: Image.Image, focus: Focus) -> Image.Image:
    """The scaled image with what was found: each kind's points and weighted centroid, the focal
    point (green circle) and the crop (green rectangle)."""
    im = rgb.convert("RGB")
    d = ImageDraw.Draw(im)
    r = min(im.size) * 0.07
    for kind, pts in focus.points.items():
        if not pts:
            continue
        col = COLOURS[kind]
        for x, y in pts:
            d.rectangle([x - 2, y - 2, x + 2, y + 2], outline=col)
        cx, cy = centroid(pts)
        rr = max(r * focus.weights.get(kind, 0.0), 2)
        d.ellipse([cx - rr, cy - rr, cx + rr, cy + rr], outline=col)
        d.text((cx - rr, cy - rr - 12), f"{kind}: {focus.weights.get(kind, 0.0):.2f}", fill=col)
    px, py = focus.point
    d.ellipse([px - r, py - r, px + r, py + r], outline=GREEN)
    x0, y0, x1, y1 = focus.box
    d.rectangle([x0, y0, x1 - 1, y1 - 1], outline=GREEN)
    return im


def focal_crop(img: Image.Image, W: int, H: int, face_weight: float = 0.9, entropy_weight: float = 0.15,
               edges_weight: float = 0.5, debug: bool = False) -> tuple[Image.Image, Focus, Image.Image | None]:
    """-> (the W×H crop, what was found, the annotated image or None). `img` may be RGBA
    (--keep-alpha): the points are found on it composited on white, the crop keeps the alpha."""
    scaled = resize(img, cover_size(img.width, img.height, W, H))
    rgb = scaled
    if scaled.mode == "RGBA":
        rgb = Image.alpha_composite(Image.new("RGBA", scaled.size, (255, 255, 255, 255)), scaled).convert("RGB")
    focus = find_focus(rgb, W, H, face_weight, entropy_weight, edges_weight)
    return scaled.crop(focus.box), focus, (draw_debug(rgb, focus) if debug else None)
