"""What a preprocess run did: every output, every skipped file with its reason, the duplicates, the summary.

The summary is the last thing a run prints, e.g.
  preprocess: 12 images in SRC, 10 used, 31 files written to DST: 14 split tiles from 4 images,
  2 focal crops, 5 fitted, 10 flipped copies; 2 skipped: 1 not a regular file, 1 duplicate;
  duplicates: 1 exact, 1 near (1 skipped)
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .dedupe import Duplicate

# Output kinds, in the order the summary lists them.
KINDS = {"split": "split tiles", "focal": "focal crops", "autosized": "auto-sized crops", "fit": "fitted"}


@dataclass
class Output:
    path: Path                 # the PNG; its caption is path.with_suffix(".txt")
    source: Path
    kind: str                  # split | focal | autosized | fit
    size: tuple[int, int]      # (w, h)
    flipped: bool = False      # the mirrored copy of the output before it
    caption: str = ""


@dataclass
class Skip:
    path: Path
    reason: str                # short category: "not a regular file", "over the pixel limit", ...
    message: str               # the one line printed for it


@dataclass
class PreprocessResult:
    src: Path
    dst: Path
    images: int = 0                                            # image files found in SRC
    outputs: list[Output] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)          # images that produced no output
    notes: list[tuple[Path, str]] = field(default_factory=list)    # entries of SRC not read, lines about images
    duplicates: list[Duplicate] = field(default_factory=list)
    debug_images: list[Path] = field(default_factory=list)     # --focal-debug, in DST/focal-debug/
    dry_run: bool = False

    @property
    def used(self) -> int:
        """Source images with at least one output."""
        return len({o.source for o in self.outputs})

    def count(self, kind: str, flipped: bool = False) -> int:
        return sum(1 for o in self.outputs if o.kind == kind and o.flipped == flipped)

    def summary(self) -> str:
        verb = "would be written" if self.dry_run else "written"
        parts = []
        for kind, label in KINDS.items():
            n = self.count(kind)
            if n:
                src = len({o.source for o in self.outputs if o.kind == kind})
                parts.append(f"{n} {label}" + (f" from {src} image{'s' * (src != 1)}" if kind == "split" else ""))
        flips = sum(1 for o in self.outputs if o.flipped)
        if flips:
            parts.append(f"{flips} flipped copies")
        line = (f"preprocess: {self.images} images in {self.src}, {self.used} used, {len(self.outputs)} files "
                f"{verb} to {self.dst}" + (": " + ", ".join(parts) if parts else ""))
        if self.debug_images:
            line += f"; {len(self.debug_images)} focal debug images in {self.dst / 'focal-debug'}"
        if self.skipped:
            why = Counter(s.reason for s in self.skipped)
            line += f"; {len(self.skipped)} skipped: " + ", ".join(f"{n} {r}" for r, n in sorted(why.items()))
        if self.duplicates:
            exact = sum(1 for d in self.duplicates if d.exact)
            gone = sum(1 for d in self.duplicates if d.skipped)
            line += (f"; duplicates: {exact} exact, {len(self.duplicates) - exact} near"
                     + (f" ({gone} skipped)" if gone else " (kept; --dedupe skips them)"))
        return line
