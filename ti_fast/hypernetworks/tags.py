"""A1111 extra-network prompt tags (`<hypernet:NAME:STRENGTH>`) and the hypernetwork library.

After A1111 v1.10.1 modules/extra_networks.py (parse_prompt) and extra_networks_hypernet.py:
every `<kind:args>` matching `<(\\w+):([^>]+)>` is cut out of the text before tokenizing
(whatever the kind; A1111 skips kinds it has no handler for), args are split on ":", a
hypernet's NAME is the first item (the file stem) and STRENGTH the second (default 1.0); several
tags apply in prompt order. The infotext keeps the prompt as written, tags included (A1111 v1.10
adds no "Hypernet" key; it only reads the old one back as a tag).

Where ti-fast differs, on purpose: A1111 parses extra networks out of the positive prompt only
and tokenizes tags in the negative prompt as text; ti-fast removes and applies them from both
(a hypernetwork acts on the cond and uncond passes alike). An unknown name or a strength that
is not a number is an error listing the known names, where A1111 skips it silently.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..fsutil import special_reason
from .format import HypernetworkError, read_hypernetwork
from .hypernetwork import Hypernetwork

RE_EXTRA_NET = re.compile(r"<(\w+):([^>]+)>")
KIND = "hypernet"


@dataclass(frozen=True)
class Tag:
    kind: str           # "hypernet", "lora", ...
    items: tuple        # the ":"-separated arguments
    text: str           # the tag as written


def parse_extra_networks(text: str) -> tuple[str, list[Tag]]:
    """(text with every extra-network tag removed, the tags in order)."""
    tags: list[Tag] = []

    def found(m):
        tags.append(Tag(m.group(1), tuple(m.group(2).split(":")), m.group(0)))
        return ""

    return RE_EXTRA_NET.sub(found, text), tags


def hypernet_requests(tags: list[Tag]) -> list[tuple[str, float]]:
    """(name, strength) of each hypernet tag, in order; a strength that is not a number is an error."""
    out = []
    for t in tags:
        if t.kind != KIND:
            continue
        strength = 1.0
        if len(t.items) > 1:
            try:
                strength = float(t.items[1])
            except ValueError:
                raise HypernetworkError(f"{t.text}: strength {t.items[1]!r} is not a number") from None
        out.append((t.items[0], strength))
    return out


def find_hypernetworks(paths, warn: Callable[[str], None] = print) -> dict[str, Path]:
    """{name (file stem): path} for every *.pt under the folders in `paths` (recursive, links
    followed, as A1111's list_hypernetworks) and every file named directly. "None" is never a
    name (A1111). A name found twice keeps the first, with one warning line."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    found: dict[str, Path] = {}

    def add(p: Path):
        name = p.stem
        if name == "None":
            return
        if name in found and found[name] != p:
            warn(f"hypernetworks: {p}: name {name!r} already taken by {found[name]}, skipped")
            return
        found[name] = p

    for root in map(Path, paths):
        why = special_reason(root)
        if why is not None:
            raise HypernetworkError(f"--hypernetworks {root} is {why}: name a folder or a .pt file")
        if root.is_file():
            add(root)
            continue
        if not root.is_dir():
            raise HypernetworkError(f"--hypernetworks {root}: no such file or folder")
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            dirnames.sort(key=str.lower)
            for fn in sorted(filenames, key=str.lower):
                p = Path(dirpath) / fn
                if p.suffix.lower() == ".pt" and special_reason(p) is None:
                    add(p)
    return found


def unknown_name(name: str, known) -> HypernetworkError:
    """The one-line refusal of a tag naming no known hypernetwork, listing the known names."""
    listed = ", ".join(sorted(known, key=str.lower)) or "none (pass --hypernetworks DIR|FILE)"
    return HypernetworkError(f"<hypernet:{name}>: no hypernetwork named {name!r} (known: {listed})")


@dataclass
class PromptPlan:
    """What generation needs from the prompts: texts to tokenize, what to attach, what was ignored."""
    prompt: str                 # tags removed
    negative_prompt: str        # tags removed
    hypernetworks: list         # [(Hypernetwork, strength)] in tag order (prompt, then negative)
    ignored: list               # Tags of other kinds (lora, ...): removed, not applied


def plan_prompts(prompt: str, negative_prompt: str, sources=(), warn: Callable[[str], None] = print) -> PromptPlan:
    """Parse both prompts, find and read every hypernetwork they name (each file once).
    sources: folders / files (as --hypernetworks) and Hypernetwork objects (named by their
    file stem, else their name). Raises HypernetworkError before anything heavy is loaded."""
    clean, tags = parse_extra_networks(prompt)
    clean_neg, neg_tags = parse_extra_networks(negative_prompt)
    tags += neg_tags
    requests = hypernet_requests(tags)
    objects = {(h.path.stem if h.path else h.name): h for h in sources if isinstance(h, Hypernetwork)}
    paths = [s for s in sources if not isinstance(s, Hypernetwork)]
    library = find_hypernetworks(paths, warn) if paths else {}
    # a file named directly is read now, used or not: a broken one is refused before the model loads
    named = {Path(s) for s in paths if Path(s).is_file()}
    loaded: dict[Path, Hypernetwork] = {p: read_hypernetwork(p) for p in library.values() if p in named}
    chosen = []
    for name, strength in requests:
        if name in objects:
            chosen.append((objects[name], strength))
        elif name in library:
            path = library[name]
            if path not in loaded:
                loaded[path] = read_hypernetwork(path)
            chosen.append((loaded[path], strength))
        else:
            raise unknown_name(name, [*library, *objects])
    if sources and not requests:
        known = ", ".join(sorted([*library, *objects], key=str.lower)) or "none"
        warn(f"hypernetworks: none applied; add <hypernet:NAME:STRENGTH> to the prompt (known: {known})")
    return PromptPlan(clean, clean_neg, chosen, [t for t in tags if t.kind != KIND])
