"""Files the safe way: atomic writes (a temp file in the same folder, fsync, then rename over the
target, so a crash mid-write never leaves a half-written file under the final name), and the
up-front checks that keep a run from hanging on a FIFO or dying late on a read-only folder.

Nothing here opens a path it has not first `stat`ed as a regular file: opening a FIFO for
reading blocks until a writer appears, and a device file can stream forever.
"""
from __future__ import annotations

import errno
import glob
import os
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .errors import DiskFullError, FileKindError

# errno values that mean "no room": the save is refused, the previous file stays.
DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yields a temporary path beside `path`; on success it is renamed to `path`. On any failure
    (full disk included) the temporary file is removed and `path` keeps its previous content."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        # mkstemp makes 0600 (and some writers, safetensors', replace the file by their own 0600
        # temp): give the file ordinary permissions after the writer is done
        os.chmod(tmp, 0o666 & ~umask())
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(e, OSError) and e.filename in (None, tmp):
            e.filename = str(path)   # a full disk names the file the user knows, not the temp
        raise


def remove_temps(path) -> None:
    """Delete the temporary files of `path` that atomic_path left when its process was killed
    mid-write (.NAME.XXXXXXXX.tmp beside it). Only for a file this process owns, e.g. a run's
    own files under its log folder's lock."""
    path = Path(path)
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        if kind_of(tmp) == "file" and not tmp.is_symlink():
            try:
                tmp.unlink()
            except FileNotFoundError:
                pass


def remove_run_temps(folder, name: str) -> None:
    """Delete the temporary files that atomic_path left in `folder` for files named NAME-... or
    NAME.* (a run's periodic copies, previews and image embeddings) when its process was killed
    mid-write. Only for a folder this process owns, e.g. under its log folder's lock."""
    folder = Path(folder)
    if kind_of(folder) != "folder":
        return
    for pattern in (f".{glob.escape(name)}-*.tmp", f".{glob.escape(name)}.*.tmp"):
        for tmp in folder.glob(pattern):
            if kind_of(tmp) == "file" and not tmp.is_symlink():
                try:
                    tmp.unlink()
                except FileNotFoundError:
                    pass


def umask() -> int:
    """The process umask, read without changing it where Linux allows (os.umask can only be read
    by setting it, which races with other threads writing files)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(data)


def atomic_write_text(path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def is_disk_full(e: BaseException) -> bool:
    """An OSError meaning 'no room' (ENOSPC, quota, RLIMIT_FSIZE's EFBIG)."""
    return isinstance(e, OSError) and e.errno in DISK_FULL


def disk_full_error(path, e: OSError) -> DiskFullError:
    return DiskFullError(f"{path}: cannot write ({os.strerror(e.errno)}): free some space; "
                         "the previous file is intact")


# ----------------------------------------------------------------------------- what a path is

def kind_of(path) -> str:
    """'file', 'folder', 'missing', 'broken link', 'FIFO', 'socket', 'character device',
    'block device' or 'special file' — from stat (symlinks followed), never by opening it."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "broken link" if os.path.islink(path) else "missing"
    except (OSError, ValueError):     # ValueError: a NUL byte in the name
        return "missing"
    m = st.st_mode
    if stat.S_ISREG(m):
        return "file"
    if stat.S_ISDIR(m):
        return "folder"
    for test, name in ((stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"),
                       (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device")):
        if test(m):
            return name
    return "special file"


def special_reason(path) -> str | None:
    """None for a regular file (or folder); else why it must not be opened, e.g. 'a FIFO'."""
    k = kind_of(path)
    if k in ("file", "folder", "missing"):
        return None
    return "a broken symbolic link" if k == "broken link" else f"a {k}, not a regular file"


def require_file(path, what: str = "file") -> Path:
    """`path` as a Path when it is a regular file (or a link to one); else FileKindError naming
    it. Missing files are left to the caller (its message knows what the file is for)."""
    why = special_reason(path)
    if why is not None:
        raise FileKindError(f"{what} {path} is {why}: name a regular file")
    return Path(path)


def make_dir(path, flag: str) -> Path:
    """Create a folder (and its parents) named by `flag`; a place where it cannot be made (a
    read-only or virtual file system such as /proc, which os.access cannot tell for root) is a
    FileKindError naming the flag, not a traceback."""
    p = Path(path).expanduser()
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FileKindError(f"{flag} {p}: cannot be created ({e.strerror or e}): choose another folder") from None
    return p


def check_writable_dir(path, flag: str) -> Path:
    """A folder that exists and is writable, or that can be created (its nearest existing
    ancestor is a writable folder). Refuses files, special files and read-only places before
    anything heavy runs; creates nothing."""
    p = Path(path).expanduser()
    k = kind_of(p)
    if k == "folder":
        if not os.access(p, os.W_OK | os.X_OK):
            raise FileKindError(f"{flag} {p}: the folder is not writable; choose another folder or fix its permissions")
        return p
    if k != "missing":
        raise FileKindError(f"{flag} {p} is a {k if k != 'file' else 'file'}, not a folder: choose a folder")
    parent = p.absolute().parent
    while kind_of(parent) == "missing" and parent != parent.parent:
        parent = parent.parent
    pk = kind_of(parent)
    if pk != "folder":
        raise FileKindError(f"{flag} {p}: cannot be created, {parent} is a {pk}: choose another folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise FileKindError(f"{flag} {p}: cannot be created in {parent} (not writable): choose another folder")
    return p
