"""OpenCV's part of the focal crop: Haar-cascade faces and corner points (the only file importing cv2).

OpenCV is the optional `[preprocess]` extra (`opencv-python-headless<5`: OpenCV 5 removed
`CascadeClassifier` and the cascade XML files that 4.x ships in `cv2.data.haarcascades`).
It is imported inside the functions, so everything else in preprocess works without it.

Both detectors follow A1111's modules/textual_inversion/autocrop.py, run on the image already
scaled to cover the target. Differences, on purpose:
- A1111 first tries OpenCV's YuNet DNN, whose model it downloads; ti-fast downloads nothing and
  uses the shipped Haar cascades (A1111's fallback) only.
- A1111 greys an RGB array with COLOR_BGR2GRAY (red and blue weights swapped); here RGB2GRAY.
- A1111 tests `if faces:` on detectMultiScale's ndarray, which raises as soon as a cascade finds
  anything; here a cascade that finds something ends the search, as A1111 intended.
"""
from __future__ import annotations

import os

import numpy as np
from PIL import Image, ImageDraw

from ..errors import ConfigError

INSTALL = "pip install 'ti-fast[preprocess]' (or: pip install 'opencv-python-headless<5')"

# A1111's order (first cascade that finds anything wins) and minimum object size as a fraction
# of the image's short side.
CASCADES = [
    ("haarcascade_eye.xml", 0.01),
    ("haarcascade_frontalface_default.xml", 0.05),
    ("haarcascade_profileface.xml", 0.05),
    ("haarcascade_frontalface_alt.xml", 0.05),
    ("haarcascade_frontalface_alt2.xml", 0.05),
    ("haarcascade_frontalface_alt_tree.xml", 0.05),
    ("haarcascade_eye_tree_eyeglasses.xml", 0.05),
    ("haarcascade_upperbody.xml", 0.05),
]
SCALE_FACTOR = 1.1
MIN_NEIGHBORS = 7
MAX_CORNERS = 100
CORNER_QUALITY = 0.04
CORNER_MIN_DISTANCE = 0.06      # of the short side
WATERMARK_BAND = 0.9            # rows below 90% of the height are painted grey before corners
WATERMARK_GREY = "#999"


def require_opencv():
    """The cv2 module with its Haar cascades, or ConfigError saying what to install."""
    try:
        import cv2
    except ImportError:
        raise ConfigError(f"--focal-crop needs OpenCV, which is not installed: {INSTALL}") from None
    folder = getattr(getattr(cv2, "data", None), "haarcascades", None)
    if not hasattr(cv2, "CascadeClassifier") or not folder or not os.path.isdir(folder):
        raise ConfigError(f"--focal-crop needs OpenCV 4's Haar cascades, missing from the installed OpenCV "
                          f"{getattr(cv2, '__version__', '?')}: {INSTALL}")
    return cv2


def face_points(img: Image.Image) -> list[tuple[float, float]]:
    """Centres of the faces the first successful Haar cascade finds in an RGB image ([] if none)."""
    cv2 = require_opencv()
    grey = cv2.cvtColor(np.asarray(img.convert("RGB")), cv2.COLOR_RGB2GRAY)   # uint8 [h, w]
    for name, frac in CASCADES:
        path = os.path.join(cv2.data.haarcascades, name)
        if not os.path.isfile(path):
            continue
        classifier = cv2.CascadeClassifier(path)
        if classifier.empty():
            continue
        m = int(min(img.width, img.height) * frac)
        rects = classifier.detectMultiScale(grey, scaleFactor=SCALE_FACTOR, minNeighbors=MIN_NEIGHBORS,
                                            minSize=(m, m), flags=cv2.CASCADE_SCALE_IMAGE)
        if len(rects):
            return [((x + x + w) // 2, (y + y + h) // 2) for x, y, w, h in np.asarray(rects).tolist()]
    return []


def corner_points(img: Image.Image) -> list[tuple[float, float]]:
    """Up to 100 Shi-Tomasi corners of the greyscale image, the bottom 10% painted grey first so
    that a watermark there does not draw the crop ([] if none)."""
    cv2 = require_opencv()
    grey = img.convert("L")
    ImageDraw.Draw(grey).rectangle([0, img.height * WATERMARK_BAND, img.width, img.height], fill=WATERMARK_GREY)
    pts = cv2.goodFeaturesToTrack(np.asarray(grey), maxCorners=MAX_CORNERS, qualityLevel=CORNER_QUALITY,
                                  minDistance=min(img.width, img.height) * CORNER_MIN_DISTANCE,
                                  useHarrisDetector=False)
    if pts is None:
        return []
    return [(float(x), float(y)) for x, y in pts.reshape(-1, 2)]
