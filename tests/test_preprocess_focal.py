"""The focal-point crop on a real photograph (scikit-image's astronaut, Eileen Collins): the crop
keeps the face measured by hand; without the face weight it moves. Plus the debug image and the
square-image rule, through the pipeline. Needs OpenCV and scikit-image (CI installs both)."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from preprocess_helpers import need, need_cv2, outputs
from ti_fast.preprocessing import preprocess
from ti_fast.preprocessing.focal import focal_crop

# The face in the 512x512 astronaut photo, measured by hand on a 3x zoom: left and right cheek
# edges, the hairline on the forehead, the chin. (left, top, right, bottom), px.
FACE = (180, 78, 270, 178)

# Cuts that are not square (focal crop only applies to those): (left, top, right, bottom).
PORTRAIT_CUT = (100, 0, 356, 512)      # 256x512, face at x 80..170, y 78..178
LANDSCAPE_CUT = (0, 0, 512, 256)       # 512x256, face at x 180..270, y 78..178
# 362x256, face at x 30..120: here a plain centre crop (x 53..309) would cut the face, so keeping
# it is the face detection's doing (in the two cuts above the centre already holds it)
OFF_CENTRE_CUT = (150, 0, 512, 256)


def astronaut() -> Image.Image:
    data = need("skimage.data", "pip install scikit-image").astronaut()
    return Image.fromarray(data)


def face_in(cut: tuple) -> tuple:
    return (FACE[0] - cut[0], FACE[1] - cut[1], FACE[2] - cut[0], FACE[3] - cut[1])


def contains(box, inner) -> bool:
    return box[0] <= inner[0] and box[1] <= inner[1] and inner[2] <= box[2] and inner[3] <= box[3]


@pytest.mark.parametrize("cut", [PORTRAIT_CUT, LANDSCAPE_CUT, OFF_CENTRE_CUT],
                         ids=["256x512", "512x256", "362x256-face-off-centre"])
def test_focal_crop_keeps_the_face(cut):
    need_cv2()
    img = astronaut().crop(cut)
    face = face_in(cut)
    if cut == OFF_CENTRE_CUT:
        left = (img.width - 256) // 2
        assert not contains((left, 0, left + 256, 256), face)          # the centre crop would lose it
    crop, focus, _ = focal_crop(img, 256, 256)
    assert crop.size == (256, 256) and focus.scaled == img.size        # covers already: scale 1
    assert focus.points["faces"], "no Haar cascade found the face"
    for x, y in focus.points["faces"]:                                 # what was found is on the face
        assert face[0] <= x <= face[2] and face[1] <= y <= face[3], (x, y)
    assert contains(focus.box, face), (focus.box, face)
    assert np.array_equal(np.asarray(crop), np.asarray(img.crop(focus.box)))
    # without the face weight the point is decided by corners and entropy: the crop moves
    _, no_face, _ = focal_crop(img, 256, 256, face_weight=0)
    assert "faces" not in no_face.points and no_face.box != focus.box


def test_focal_crop_through_the_pipeline(tmp_path):
    need_cv2()
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    photo = astronaut()
    photo.crop(LANDSCAPE_CUT).save(src / "a-wide.png")
    photo.save(src / "b-square.png")                                   # square: plain fit, no focal crop
    res = preprocess(src, dst, width=256, height=256, focal_crop=True, focal_debug=True, flip=True, quiet=True)
    assert outputs(dst) == ["00000-0-a-wide.png", "00000-1-a-wide.png", "00001-0-b-square.png",
                            "00001-1-b-square.png"]
    assert [(o.kind, o.flipped) for o in res.outputs] == [("focal", False), ("focal", True), ("fit", False),
                                                           ("fit", True)]
    _, focus, _ = focal_crop(photo.crop(LANDSCAPE_CUT), 256, 256)
    got = np.asarray(Image.open(dst / "00000-0-a-wide.png"))
    assert np.array_equal(got, np.asarray(photo.crop(LANDSCAPE_CUT).crop(focus.box)))
    assert np.array_equal(np.asarray(Image.open(dst / "00000-1-a-wide.png")), got[:, ::-1])
    # the debug image: the scaled source with the crop drawn in green; not a training image
    assert res.debug_images == [dst / "focal-debug" / "00000-a-wide.png"]
    dbg = np.asarray(Image.open(res.debug_images[0]).convert("RGB"))
    assert dbg.shape == (256, 512, 3)
    x0, y0, x1, y1 = focus.box
    green = np.array([0, 255, 0])
    assert (dbg[200:250, x0] == green).all() and (dbg[200:250, x1 - 1] == green).all()
    assert sorted(p.name for p in (dst / "focal-debug").iterdir()) == ["00000-a-wide.png"]
