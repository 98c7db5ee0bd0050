"""Prompt templates: one prompt per line, `[name]` = the embedding's trigger word, `[filewords]` =
the image's caption. Built-in files live in templates/<name>.txt (our own lines).

A1111 (modules/textual_inversion/dataset.py, create_text) compatibility:
- `[filewords]` is replaced first, then `[name]`, so a caption may itself contain `[name]`.
- Tag dropout (each comma-separated tag kept with probability 1 − p) runs before the shuffle.
- A1111 draws one template line per image for the whole run unless shuffle/dropout is on
  (issue 9364); here the caller draws a fresh line every time an image is used (draw_prompt).
Differences, deliberate:
- Tags are stripped and re-joined with ", " when shuffled/dropped (A1111 re-joins the raw
  pieces with ",", so " b,a, c" spacing wanders); without shuffle/dropout the caption is
  used verbatim.
- Tags naming the trigger (containing "[name]", or the name as a whole word) are never
  dropped: dropping them would silently take the embedding out of the prompt.
- Empty captions leave no stray separators ("x, , y" -> "x, y", no leading/trailing ", ").
- Blank template lines are ignored (A1111 keeps them as empty prompts).
- `hypernetwork` (A1111's default for hypernetworks, `ti-fast train-hypernetwork`'s here): style-like
  lines around `[filewords]` without `[name]` — a hypernetwork has no trigger word.
- `none` is the single line "[filewords]": the caption is the whole prompt and must contain
  `[name]` or the name itself. (A1111's none.txt is "picture", which has no [name]: for an
  embedding it trains nothing.) `check_name_reachable` catches that mistake up front.
"""
from __future__ import annotations

import random
import re
from pathlib import Path

from .data import DataError

TEMPLATES = ("subject", "subject_filewords", "style", "style_filewords", "none", "hypernetwork")
_DIR = Path(__file__).with_suffix("")          # ti_fast/training/templates/
_COMMA_RUNS = re.compile(r"\s*,(\s*,)+\s*")     # ", ," left by an empty [filewords]


def load_template(name_or_file) -> list[str]:
    """Lines of a built-in template (by name) or of a template file; blank lines dropped."""
    s = str(name_or_file)
    path = _DIR / f"{s}.txt" if s in TEMPLATES else Path(s).expanduser()
    if not path.is_file():
        raise DataError(f"unknown template {s!r}: use one of {', '.join(TEMPLATES)} "
                        "or the path of a text file with one prompt per line")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read template {path}: {e}; save it as UTF-8 text") from None
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise DataError(f"template {path} has no prompts: write one prompt per line, using [name]")
    return lines


def _names_trigger(text: str, name: str) -> bool:
    """Does `text` hold the trigger: "[name]", or the name as a whole word ("zork." counts,
    "zorkish" does not)?"""
    return "[name]" in text or (bool(name) and re.search(
        rf"(?<!\w){re.escape(name)}(?!\w)", text) is not None)


def render_prompt(line: str, name: str, caption: str, *, shuffle_tags: bool = False,
                  tag_dropout: float = 0.0, rng: random.Random | None = None) -> str:
    """One prompt from one template line. Uses `rng` only for dropout (one draw per tag, in
    caption order) and shuffle, so a seeded rng gives the same prompts; needed only then."""
    if not 0.0 <= tag_dropout <= 1.0:
        raise ValueError(f"tag dropout must be in [0, 1], got {tag_dropout}")
    words = caption
    if shuffle_tags or tag_dropout > 0:
        if rng is None:
            raise ValueError("render_prompt needs rng for tag shuffle/dropout")
        tags = [t.strip() for t in caption.split(",") if t.strip()]
        if tag_dropout > 0:
            # draw for every tag (protected ones too) so the stream does not depend on the name
            tags = [t for t in tags if rng.random() >= tag_dropout or _names_trigger(t, name)]
        if shuffle_tags:
            rng.shuffle(tags)
        words = ", ".join(tags)
    text = line.replace("[filewords]", words).replace("[name]", name)
    return _COMMA_RUNS.sub(", ", text).strip(" ,")


def draw_prompt(lines: list[str], name: str, caption: str, rng: random.Random,
                shuffle_tags: bool = False, tag_dropout: float = 0.0) -> str:
    """A fresh template line for each use of an image, then render it."""
    return render_prompt(rng.choice(lines), name, caption, shuffle_tags=shuffle_tags,
                         tag_dropout=tag_dropout, rng=rng)


def check_name_reachable(lines: list[str], captions: list[str], name: str) -> None:
    """DataError unless every prompt that can be drawn contains the trigger: a line without
    [name] is fine only if it has [filewords] and every caption names the trigger."""
    for line in lines:
        if "[name]" in line:
            continue
        if "[filewords]" not in line:
            raise DataError(f"template line {line!r} has neither [name] nor [filewords]: the "
                            "embedding would never be in that prompt; add [name] to it")
        for cap in captions:
            if not _names_trigger(cap, name):
                raise DataError(f"template line {line!r} relies on the caption for the trigger, "
                                f"but caption {cap!r} has neither [name] nor {name!r}; add it "
                                "or use a template with [name]")
