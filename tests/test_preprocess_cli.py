"""`ti-fast preprocess` on the command line: bad input -> exit 2 and one line; special files and
decompression bombs skipped with one line each and never opened; OpenCV optional; the summary."""
from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from contextlib import redirect_stderr
from pathlib import Path

import pytest
from PIL import Image

from forked import main_as_nobody
from preprocess_helpers import noise, outputs, png_bomb, position_image
from ti_fast.cli import main

ROOT = Path(__file__).resolve().parents[1]


def child_env(**extra) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.update(extra)
    return env


def one_error_line(capsys, argv) -> str:
    rc = main(argv)
    out, err = capsys.readouterr()
    assert rc == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ti-fast: error: "), err
    return lines[0]


@pytest.fixture
def src(tmp_path) -> Path:
    d = tmp_path / "src"
    d.mkdir()
    noise(64, 64).save(d / "a.png")
    return d


@pytest.mark.parametrize("extra,words", [
    (["--width", "500"], "--width 500 must be a multiple of 8"),
    (["--height", "100"], "try 96"),
    (["--width", "56"], "at least 64"),
    (["--fit", "squash", "--autosized-crop"], "--fit has no effect with --autosized-crop"),
    (["--buckets", "--autosized-crop"], "--buckets has no effect"),
    (["--fit", "stretch"], "--fit 'stretch'"),
    (["--focal-debug"], "add --focal-crop"),
    (["--join", ", "], "add --filename-regex"),
    (["--filename-regex", "("], "not a valid regular expression"),
    (["--split", "--split-threshold", "1"], "--split-threshold 1.0 must lie in [0, 1)"),
    (["--overlap", "1.5"], "--overlap 1.5"),
    (["--dedupe-distance", "65"], "--dedupe-distance 65"),
    (["--min-size", "832"], "above --max-size"),
    (["--min-area", "500000"], "above --max-area"),
    (["--objective", "speed"], "--objective 'speed'"),
    (["--focal-crop", "--face-weight", "0", "--entropy-weight", "0", "--edges-weight", "0"], "all three weights 0"),
    (["--entropy-weight", "-1"], "--entropy-weight -1.0"),
])
def test_bad_flags_one_line(capsys, src, tmp_path, extra, words):
    line = one_error_line(capsys, ["preprocess", str(src), str(tmp_path / "dst"), *extra])
    assert words in line
    assert not (tmp_path / "dst").exists()


def test_bad_folders_one_line(capsys, src, tmp_path):
    dst = str(tmp_path / "dst")
    assert "does not exist" in one_error_line(capsys, ["preprocess", str(tmp_path / "nope"), dst])
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    assert "has no images" in one_error_line(capsys, ["preprocess", str(tmp_path / "empty"), dst])
    assert "not a folder" in one_error_line(capsys, ["preprocess", str(src / "a.png"), dst])
    assert "inside the source folder" in one_error_line(capsys, ["preprocess", str(src), str(src / "out")])
    assert "inside the source folder" in one_error_line(capsys, ["preprocess", str(src), str(src)])
    (tmp_path / "afile").write_text("x")
    assert "not a folder" in one_error_line(capsys, ["preprocess", str(src), str(tmp_path / "afile")])
    assert "cannot be created" in one_error_line(capsys, ["preprocess", str(src), str(tmp_path / "afile" / "x")])
    assert not (src / "out").exists()
    # a non-empty output folder needs --overwrite
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    assert "--overwrite" in one_error_line(capsys, ["preprocess", str(src), str(tmp_path / "full")])
    assert main(["preprocess", str(src), str(tmp_path / "full"), "--overwrite", "--quiet", "--width", "64",
                 "--height", "64"]) == 0
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    # nothing usable at all
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.png").write_bytes(b"garbage")
    assert main(["preprocess", str(tmp_path / "junk"), dst, "--quiet"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and "x.png" in lines[0] and lines[1].startswith("ti-fast: error: none of the 1 images")
    assert not Path(dst).exists()


CHILD = "import sys; from ti_fast.cli import main; sys.exit(main(sys.argv[1:]))"


def test_output_folder_not_writable():
    """Read-only output folders, as an unprivileged user: root may write anywhere, so as root the
    check runs in a child process switched to nobody."""
    base = Path(tempfile.mkdtemp(prefix="ti-fast-ro-"))
    ro = base / "ro"
    try:
        os.chmod(base, 0o755)
        src = base / "src"
        src.mkdir()
        noise(64, 64).save(src / "a.png")
        os.chmod(src / "a.png", 0o644)
        ro.mkdir()
        os.chmod(ro, 0o555)
        for dst, words in ((ro, "not writable"), (ro / "new", "cannot be created")):
            argv = ["preprocess", str(src), str(dst), "--width", "64", "--height", "64"]
            if os.geteuid() == 0:
                rc, err = main_as_nobody(argv)
            else:
                buf = io.StringIO()
                with redirect_stderr(buf):
                    rc = main(argv)
                err = buf.getvalue()
            lines = err.strip().splitlines()
            assert rc == 2 and len(lines) == 1 and lines[0].startswith("ti-fast: error: output folder"), err
            assert words in lines[0]
        assert not any(ro.iterdir())
    finally:
        if ro.exists():
            os.chmod(ro, 0o755)
        shutil.rmtree(base)


def test_special_files_and_bombs_skipped_never_opened(tmp_path):
    """FIFOs, a socket, a device (/dev/zero would stream forever), a broken link and PNG bombs:
    one line each, nothing opened — in a child process with a timeout, so a hang fails the test."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    position_image(64, 64).save(src / "good.png")
    os.mkfifo(src / "pipe.png")
    os.mkfifo(src / "pipe.txt")                       # a FIFO where good.png's caption could be
    os.mkfifo(src / "fifo")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(src / "sock.jpg"))
    os.symlink("/dev/zero", src / "zero.png")
    os.symlink(src / "missing.png", src / "broken.png")
    png_bomb(src / "bomb.png", 10_000, 10_000)         # over ti-fast's 64 MP bound, under Pillow's guard
    png_bomb(src / "huge.png", 100_000, 100_000)       # over Pillow's own guard too
    try:
        r = subprocess.run([sys.executable, "-c", CHILD, "preprocess", str(src), str(dst), "--width", "64",
                            "--height", "64"], capture_output=True, text=True, timeout=300, env=child_env())
    finally:
        sock.close()
    assert r.returncode == 0, r.stderr
    assert outputs(dst) == ["00002-0-good.png"]        # image files in name order: bomb, broken, good, ...
    lines = [ln for ln in r.stderr.replace("\r", "\n").splitlines() if "src" in ln and "preprocess:" not in ln]
    for name, words in (("pipe.png", "FIFO"), ("sock.jpg", "socket"), ("zero.png", "character device"),
                        ("broken.png", "broken symbolic link"), ("bomb.png", "100 megapixels, over the 67 MP"),
                        ("huge.png", "decompression bomb"), ("fifo", "FIFO"),
                        ("pipe.txt", "FIFO")):
        hits = [ln for ln in lines if name in ln]
        assert len(hits) == 1 and words in hits[0], (name, lines)
    summary = r.stdout.strip().splitlines()
    assert len(summary) == 1 and summary[0].startswith("preprocess: 7 images in ")
    assert "4 not a regular file" in summary[0] and "2 over the pixel limit" in summary[0]
    assert (dst / "00002-0-good.txt").read_text() == "good"


def test_without_opencv(tmp_path):
    """OpenCV blocked (sys.modules['cv2'] = None) before ti_fast is imported: --focal-crop ->
    exit 2 and one line naming what to install; split, auto-sized crop, flip all still work."""
    src = tmp_path / "src"
    src.mkdir()
    position_image(300, 100).save(src / "wide.png")
    code = ("import sys; sys.modules['cv2'] = None\n"
            "from ti_fast.cli import main\n"
            "a = sys.argv[1:]\n"
            "print('RC', main(['preprocess', *a[:2], '--focal-crop']), file=sys.stderr)\n"
            "print('RC', main(['preprocess', a[0], a[2], '--quiet', '--split', '--flip', '--width', '64', '--height', "
            "'64']), file=sys.stderr)\n"
            "print('RC', main(['preprocess', a[0], a[3], '--quiet', '--autosized-crop', '--min-size', '64', "
            "'--objective', 'error']), file=sys.stderr)\n")
    r = subprocess.run([sys.executable, "-c", code, str(src), str(tmp_path / "a"), str(tmp_path / "b"),
                        str(tmp_path / "c")], capture_output=True, text=True, timeout=300, env=child_env())
    lines = r.stderr.strip().splitlines()
    assert lines[0].startswith("ti-fast: error: --focal-crop needs OpenCV") and "opencv-python-headless<5" in lines[0]
    assert lines[1:] == ["RC 2", "RC 0", "RC 0"], r.stderr
    assert not (tmp_path / "a").exists()
    assert len(outputs(tmp_path / "b")) == 8                # 4 tiles + 4 flipped
    assert [Image.open(tmp_path / "c" / n).size for n in outputs(tmp_path / "c")] == [(768, 256)]


def test_every_flag_in_the_readme():
    from ti_fast.preprocessing.cli import PREPROCESS_FLAGS, _flag
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("### `ti-fast preprocess SRC DST`")[1].split("\n### ")[0]
    for _, name, _ in PREPROCESS_FLAGS:
        assert f"`{_flag(name)}`" in section, name
