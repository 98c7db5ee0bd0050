"""The home folder and the one way into it: every path a request names is resolved here.

Nothing outside HOME is ever read or written.

    HOME/datasets/NAME/        uploaded images and captions
    HOME/embeddings/           the embedding library (A1111's embeddings dir)
    HOME/hypernetworks/        the hypernetwork library
    HOME/logs/                 one log folder per job (loss.csv, previews, state.pt, settings.json)
    HOME/outputs/              txt2img images
    HOME/templates/            prompt template files a job may name
    HOME/cache/                latent caches a job may name (--cache-dir)
    HOME/tmp/                  uploads while they are checked (emptied at start)
    HOME/jobs.sqlite           the job queue (WAL)

Refused: absolute paths outside HOME, `..` and `.` components, NUL and backslash, components that
look URL-encoded (`%2e%2e`), and any symbolic link on the way (a link inside HOME could point
anywhere). Names (datasets, files) keep A1111's characters: letters, digits and "._- ".
"""
from __future__ import annotations

import os
import re
import shutil
import stat
import tempfile
from pathlib import Path

from .errors import NotFound, PathRefused

SUBDIRS = ("datasets", "embeddings", "hypernetworks", "logs", "outputs", "templates", "cache", "tmp")
_ENCODED = re.compile(r"%[0-9a-fA-F]{2}")
NAME_BYTES = 128


def safe_name(raw, what: str) -> str:
    """A single file or folder name as given, when it is safe as it stands: letters, digits and
    "._- ", not starting with '.', not empty, at most 128 bytes. Refused otherwise (not silently
    changed: a client must know which name it got)."""
    name = str(raw)
    if not name or name != name.strip() or name.startswith(".") or len(name.encode("utf-8")) > NAME_BYTES:
        raise PathRefused(f"{what} {name!r}: use 1-{NAME_BYTES} bytes of letters, digits and '._- ', "
                          "not starting with '.' or a space")
    if _ENCODED.search(name) or not all(ch.isalnum() or ch in "._- " for ch in name):
        raise PathRefused(f"{what} {name!r}: only letters, digits and '._- ' are allowed in names")
    return name


def _components(value: str, flag: str) -> list[str]:
    if "\x00" in value or "\\" in value:
        raise PathRefused(f"{flag} {value!r}: NUL and backslash are not allowed in paths")
    parts = [p for p in value.split("/") if p != ""]
    for p in parts:
        if p in (".", ".."):
            raise PathRefused(f"{flag} {value!r}: '..' and '.' are not allowed (paths stay inside the home folder)")
        if _ENCODED.search(p):
            raise PathRefused(f"{flag} {value!r}: looks URL-encoded; send the plain path")
    return parts


class Home:
    def __init__(self, root):
        self.root = Path(root).expanduser().absolute()
        self.root.mkdir(parents=True, exist_ok=True)
        self.root = Path(os.path.realpath(self.root))
        for sub in SUBDIRS:
            d = self.root / sub
            if d.is_symlink() or (d.exists() and not d.is_dir()):
                raise PathRefused(f"--home {self.root}: {sub} must be a plain folder (not a link or a file)")
            d.mkdir(exist_ok=True)

    def public(self, text: str | None) -> str | None:
        """A message for clients: paths under the home folder as HOME/..., so a job's error does
        not show where the server keeps its files."""
        return None if text is None else str(text).replace(str(self.root), "HOME")

    @property
    def db_path(self) -> Path:
        return self.root / "jobs.sqlite"

    def dir(self, sub: str) -> Path:
        return self.root / sub

    def clean_tmp(self) -> None:
        """Uploads a crash left half-checked: nothing in tmp/ survives a start."""
        for p in self.dir("tmp").iterdir():
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)

    def tmpdir(self, prefix: str) -> Path:
        return Path(tempfile.mkdtemp(prefix=prefix, dir=self.dir("tmp")))

    # ------------------------------------------------------------------ resolving
    def inside(self, sub: str, value, flag: str, *, must_exist: str | None = None) -> Path:
        """`value` as a path under HOME/sub (a relative path) or anywhere inside HOME (an absolute
        one). must_exist: None, "file" or "folder". PathRefused / NotFound naming the flag."""
        value = str(value)
        base = self.dir(sub)
        if os.path.isabs(value):
            parts = _components(value, flag)
            real_abs = os.path.normpath(value)
            root = str(self.root)
            if not (real_abs == root or real_abs.startswith(root + os.sep)):
                raise PathRefused(f"{flag} {value!r}: absolute paths must lie inside the home folder {self.root}")
            base, parts = self.root, _components(os.path.relpath(real_abs, root), flag) if real_abs != root else []
            if parts and (parts[0] == "tmp" or parts[0].startswith(self.db_path.name)):
                raise PathRefused(f"{flag} {value!r}: the server's own files (tmp/, the job database) are not for jobs")
        else:
            parts = _components(value, flag)
        if not parts:
            raise PathRefused(f"{flag} {value!r}: name something inside the home folder's {base.name}/")
        return self._walk(base, parts, value, flag, must_exist)

    def child(self, sub: str, name, what: str, *, must_exist: str | None = None) -> Path:
        """One safe name directly inside HOME/sub."""
        return self._walk(self.dir(sub), [safe_name(name, what)], str(name), what, must_exist)

    def below(self, base: Path, rel: str, flag: str, *, must_exist: str | None = None) -> Path:
        """A relative path under `base` (itself inside HOME: a job's log folder)."""
        base = Path(base)
        if not self.contains(base):
            raise PathRefused(f"{flag}: outside the home folder")
        return self._walk(base, _components(str(rel), flag), str(rel), flag, must_exist)

    def contains(self, p: Path) -> bool:
        real = os.path.realpath(p)
        return real == str(self.root) or real.startswith(str(self.root) + os.sep)

    def _walk(self, base: Path, parts: list[str], value: str, flag: str, must_exist: str | None) -> Path:
        """base/parts, refusing a symbolic link at any existing step (lstat, never followed)."""
        p = base
        for i, part in enumerate(parts):
            p = p / part
            try:
                st = os.lstat(p)
            except FileNotFoundError:
                if must_exist:
                    raise NotFound(f"{flag} {value!r}: no such {must_exist}") from None
                return p.joinpath(*parts[i + 1:])
            except OSError as e:
                raise PathRefused(f"{flag} {value!r}: {e.strerror}") from None
            if stat.S_ISLNK(st.st_mode):
                raise PathRefused(f"{flag} {value!r}: symbolic links are not followed")
        if must_exist == "file" and not stat.S_ISREG(os.lstat(p).st_mode):
            raise NotFound(f"{flag} {value!r}: not a regular file")
        if must_exist == "folder" and not stat.S_ISDIR(os.lstat(p).st_mode):
            raise NotFound(f"{flag} {value!r}: not a folder")
        if not self.contains(p):           # belt and braces: what the kernel says
            raise PathRefused(f"{flag} {value!r}: outside the home folder")
        return p

    def relative(self, p: Path) -> str:
        return str(Path(p).relative_to(self.root))

    def files(self, sub: str, exts: tuple[str, ...]) -> list[Path]:
        """Regular files directly in HOME/sub with these extensions (links skipped), sorted."""
        out = []
        for p in sorted(self.dir(sub).iterdir()):
            if p.suffix.lower() in exts and not p.name.startswith(".") and stat.S_ISREG(os.lstat(p).st_mode):
                out.append(p)
        return out
