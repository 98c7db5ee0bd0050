"""Faults lose nothing: real signals, kill -9, a second trainer, a full disk, read-only folders,
a crash and an OOM inside a run, and --resume with changed settings — each driven for real (a
child process trains on the tiny model and is stopped by the parent at a point it announces),
then checked the same way: the state (LOG/state.pt), NAME.pt, NAME.safetensors and loss.csv
agree on the step, no temporary file is left, written files have the umask's mode, and resuming
finishes bitwise equal (vectors and loss.csv rows) to a run that was never interrupted.

Files are read here with torch.load, safetensors and csv directly, not with ti-fast's readers."""
from __future__ import annotations

import csv
import errno
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from ti_fast.cli import main
from ti_fast.errors import ConfigError
from ti_fast.training import step as step_mod
from ti_fast.training.loop import train
from forked import in_child, main_as_nobody
from train_helpers import quick_config

ROOT = Path(__file__).resolve().parents[1]
N = 8                                   # steps of the uninterrupted reference run
THREADS = 1                             # every run here uses it: CPU results depend on it
WAIT_S = 120                            # a child that announces nothing for this long failed

# The children are forked by a server process that imported torch, transformers and ti-fast
# once and has run no torch op (so it holds no OpenMP threads a fork could break): each child
# costs a model load, not five seconds of imports. A child runs `ti-fast train` (cli.main: the
# real signal handlers) with the faults its spec asks for, announcing where it is by touching
# files in spec["marks"]:
#   pause_step K      after the K-th step: touch "step", wait for "go"
#   pause_write W     inside the first write W (state | pt | st): touch "saving", wait for "go2"
#   kill_at SUFFIX    SIGKILL itself when a finished temp file is renamed onto *SUFFIX
#   fsize BYTES       RLIMIT_FSIZE (SIGXFSZ ignored, so writes past it fail with EFBIG)
#   umask M
# and every signal the run's handler receives is announced as "signal1", "signal2", ...
SERVER = r"""
import json, os, signal, sys, time, traceback
from pathlib import Path
import torch, torch._dynamo, transformers                 # imports only: no torch op runs here
transformers.CLIPTokenizer
import ti_fast.hypernetworks.cli, ti_fast.interop.cli, ti_fast.preprocessing.cli, ti_fast.sample.cli
from ti_fast.cli import main
from ti_fast.training import checkpointer, control, group, loop, step, trainable

def child(spec):
    marks = Path(spec["marks"])

    def wait_for(name):
        end = time.monotonic() + 100
        while not (marks / name).exists():
            if time.monotonic() > end:
                os._exit(98)
            time.sleep(0.002)

    if spec.get("umask") is not None:
        os.umask(spec["umask"])
    if spec.get("fsize"):
        import resource
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (spec["fsize"], resource.RLIM_INFINITY))
    real_handler, seen = control.Stopper._on_signal, [0]
    def announced(self, signum, frame):
        seen[0] += 1
        (marks / f"signal{seen[0]}").touch()
        return real_handler(self, signum, frame)
    control.Stopper._on_signal = announced
    if spec.get("pause_step"):
        real_step, calls = step.GroupStep.__call__, [0]
        def paused(self, mbs):
            out = real_step(self, mbs)          # the update is made: only the saved state may count
            calls[0] += 1
            if calls[0] == spec["pause_step"]:
                (marks / "step").touch()
                wait_for("go")
            return out
        step.GroupStep.__call__ = paused
    if spec.get("pause_write"):
        mod, name = {"state": (checkpointer, "save_state"), "pt": (trainable, "save_pt"),
                     "st": (trainable, "save_safetensors")}[spec["pause_write"]]
        real_write = getattr(mod, name)
        def slow(*a, **k):
            (marks / "saving").touch()
            wait_for("go2")
            return real_write(*a, **k)
        setattr(mod, name, slow)
    if spec.get("kill_at"):
        real_replace = os.replace
        def replace(src, dst, *a, **k):
            if str(dst).endswith(spec["kill_at"]):
                os.kill(os.getpid(), signal.SIGKILL)
            return real_replace(src, dst, *a, **k)
        os.replace = replace
    return main(spec["argv"])

for line in sys.stdin:
    spec = json.loads(line)
    pid = os.fork()
    if pid == 0:
        code = 99
        try:
            fd = os.open(spec["output"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            os.close(0)
            os.chdir(spec["cwd"])
            code = child(spec)
        except SystemExit as e:
            code = e.code
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    print(pid, flush=True)
    print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)
"""


def argv(model, tmp: Path, *extra, steps: int = N) -> list[str]:
    """`ti-fast train` with exactly quick_config's settings (so runs compare bitwise)."""
    c = quick_config(model, tmp, steps=steps)
    return ["train", "--name", c.name, "--data", c.data, "--model", c.model, "--width", "64", "--height", "64",
            "--steps", str(steps), "--lr", c.lr, "--save-every", "0", "--seed", str(c.seed), "--out", c.out,
            "--log-dir", c.log_dir, "--device", "cpu", "--vectors", "2", "--init-text", c.init_text,
            "--template", c.template, "--quiet", "--threads", str(THREADS), *extra]


class Server:
    def __init__(self, tmp: Path):
        env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(THREADS),
                   PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]))
        self.log = tmp / "server.log"
        self.p = subprocess.Popen([sys.executable, "-c", SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=open(self.log, "wb"), env=env, text=True, bufsize=1)
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [self.lines.put(x) for x in self.p.stdout], daemon=True).start()
        self.current: Child | None = None

    def line(self, timeout: float | None = WAIT_S) -> str | None:
        try:
            return self.lines.get(timeout=timeout) if timeout else self.lines.get_nowait()
        except queue.Empty:
            if timeout:
                pytest.fail(f"the fork server did not answer: {self.log.read_text()[-3000:]}")
            return None

    def reap(self) -> None:
        """A child a failed test left running is killed, so the next one starts clean."""
        if self.current is not None and self.current.rc is None:
            try:
                os.kill(self.current.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.current.finish()

    def close(self) -> None:
        self.reap()
        self.p.stdin.close()
        self.p.wait(timeout=30)


class Child:
    def __init__(self, server: Server, tmp: Path, args: list[str], **spec):
        self.server, self.marks, self.output = server, tmp / "marks", tmp / "child.log"
        self.marks.mkdir(parents=True, exist_ok=True)
        server.reap()
        server.current = self
        spec = {**spec, "argv": args, "marks": str(self.marks), "output": str(self.output), "cwd": str(tmp)}
        server.p.stdin.write(json.dumps(spec) + "\n")
        server.p.stdin.flush()
        self.pid = int(server.line())
        self.rc: int | None = None

    def wait(self, mark: str) -> None:
        end = time.monotonic() + WAIT_S
        while not (self.marks / mark).exists():
            if self.rc is None and (rc := self.server.line(timeout=None)) is not None:
                self.rc = int(rc)
            if self.rc is not None or time.monotonic() > end:
                pytest.fail(f"the child never reached {mark!r} (rc {self.rc}): {self.output.read_text()[-3000:]}")
            time.sleep(0.005)

    def signal(self, sig: int, n: int) -> None:
        """Send `sig` and wait until the run's handler has seen it (its n-th signal)."""
        os.kill(self.pid, sig)
        self.wait(f"signal{n}")

    def go(self, mark: str) -> None:
        (self.marks / mark).touch()

    def finish(self) -> tuple[int, str]:
        if self.rc is None:
            self.rc = int(self.server.line())
        return self.rc, self.output.read_text()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("server"))
    yield s
    s.close()


# ----------------------------------------------------------------------------- independent readers

def read_pt(path: Path) -> tuple[int, torch.Tensor]:
    d = torch.load(path, map_location="cpu", weights_only=True)
    (v,) = d["string_to_param"].values()
    return int(d["step"]), v


def read_st(path: Path) -> tuple[int, torch.Tensor]:
    with safe_open(str(path), "pt") as f:
        return int(f.metadata()["step"]), f.get_tensor("emb_params")


def loss_rows(log: Path) -> list[list[str]]:
    with open(log / "loss.csv", newline="") as f:
        return list(csv.reader(f))


def agreed_step(tmp: Path) -> int:
    """The one step the state, NAME.pt, NAME.safetensors and loss.csv all stand at."""
    state = torch.load(tmp / "log" / "state.pt", map_location="cpu", weights_only=True)
    step = int(state["step"])
    for reader, path in ((read_pt, tmp / "out" / "tok.pt"), (read_st, tmp / "out" / "tok.safetensors")):
        s, v = reader(path)
        assert s == step and torch.equal(v, state["vectors"]), (path, s, step)
    assert [int(r[0]) for r in loss_rows(tmp / "log")[1:]] == list(range(1, step + 1))
    return step


def clean_files(tmp: Path, umask: int = 0o022) -> None:
    """No temporary file anywhere; every file the run wrote has mode 0666 & ~umask."""
    for sub in ("out", "log"):
        for p in (tmp / sub).rglob("*"):
            assert not p.name.endswith(".tmp"), p
            if p.is_file():
                assert p.stat().st_mode & 0o777 == 0o666 & ~umask, (p, oct(p.stat().st_mode))


def same_as_reference(tmp: Path, ref: Path) -> None:
    for reader, name in ((read_pt, "tok.pt"), (read_st, "tok.safetensors")):
        (s, v), (rs, rv) = reader(tmp / "out" / name), reader(ref / "out" / name)
        assert s == rs == N and torch.equal(v, rv), name
    assert loss_rows(tmp / "log") == loss_rows(ref / "log")


def resume_to_end(model, tmp: Path) -> None:
    res = train(quick_config(model, tmp, steps=N, resume=True))
    assert res.status == "completed" and res.steps == N


def run_cli(args: list[str], capsys) -> tuple[int, list[str]]:
    try:
        rc = main(args)
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return rc, [ln for ln in err.splitlines() if ln.strip()]


@contextmanager
def threads(n: int = THREADS):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@pytest.fixture(scope="module")
def reference(tiny_single, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("reference")
    with threads():
        assert train(quick_config(tiny_single, tmp, steps=N)).status == "completed"
    return tmp


@pytest.fixture(autouse=True)
def _threads():
    with threads():                     # the in-process runs as the children (and pytest as it was)
        yield


# ----------------------------------------------------------------------------- signals

@pytest.mark.parametrize("first, second, write, umask", [
    (signal.SIGINT, signal.SIGINT, "state", 0o022),
    (signal.SIGTERM, signal.SIGTERM, "st", 0o027),
], ids=["int-int-in-state", "term-term-in-safetensors"])
def test_second_signal_during_the_save_still_saves(server, tiny_single, tmp_path, reference, first, second, write, umask):
    child = Child(server, tmp_path, argv(tiny_single, tmp_path), pause_step=3, pause_write=write, umask=umask)
    child.wait("step")                  # inside step 3
    child.signal(first, 1)              # the run stops after this step ...
    child.go("go")
    child.wait("saving")                # ... and saves; a second signal lands inside the save
    child.signal(second, 2)
    child.go("go2")
    rc, err = child.finish()
    assert rc == 130 and "Traceback" not in err, err
    assert agreed_step(tmp_path) == 3
    clean_files(tmp_path, umask)
    resume_to_end(tiny_single, tmp_path)
    same_as_reference(tmp_path, reference)


def test_second_signal_inside_a_step_saves_the_last_checked_step(server, tiny_single, tmp_path, reference):
    child = Child(server, tmp_path, argv(tiny_single, tmp_path), pause_step=3)
    child.wait("step")                  # step 3 has updated the vectors, but is not finished
    child.signal(signal.SIGINT, 1)
    child.signal(signal.SIGINT, 2)      # KeyboardInterrupt inside the step
    rc, err = child.finish()
    assert rc == 130 and "Traceback" not in err, err
    assert agreed_step(tmp_path) == 2   # the last checked state, not the half-done step 3
    clean_files(tmp_path)
    resume_to_end(tiny_single, tmp_path)
    same_as_reference(tmp_path, reference)


# ----------------------------------------------------------------------------- kill -9

@pytest.mark.parametrize("first, kill_at", [
    (4, "out/tok.pt"),                  # resumed segment: loss.csv and the state written, the pair not
    (4, "log/state.pt"),                # resumed segment: loss.csv written, the state not
], ids=["between-state-and-pair", "between-log-and-state"])
def test_kill_9_inside_the_final_save(server, tiny_single, tmp_path, reference, first, kill_at):
    train(quick_config(tiny_single, tmp_path, steps=first))
    child = Child(server, tmp_path, argv(tiny_single, tmp_path, "--resume"), kill_at=kill_at)
    rc, out = child.finish()
    assert rc == -signal.SIGKILL, out
    assert list((tmp_path / kill_at).parent.glob(f".{Path(kill_at).name}.*.tmp"))   # killed mid-save
    # --resume with the same settings puts the outputs right (even with nothing left to train) ...
    res = train(quick_config(tiny_single, tmp_path, steps=N, resume=True))
    assert res.status == "completed" and res.steps == N
    assert agreed_step(tmp_path) == N
    clean_files(tmp_path)
    same_as_reference(tmp_path, reference)    # ... and the run is as if nothing had happened


def test_kill_9_inside_a_periodic_copy_leaves_no_temp_after_the_next_run(server, tiny_single, tmp_path):
    """A run killed while writing LOG/embeddings/NAME-STEP.pt leaves its temp file; the next run
    on that log folder (it holds the lock) removes it."""
    child = Child(server, tmp_path, argv(tiny_single, tmp_path, "--save-every", "2"), kill_at="embeddings/tok-2.pt")
    rc, out = child.finish()
    assert rc == -signal.SIGKILL, out
    assert list((tmp_path / "log" / "embeddings").glob(".tok-2.pt.*.tmp"))     # killed mid-write
    res = train(quick_config(tiny_single, tmp_path, steps=N, save_every=2, overwrite=True))
    assert res.status == "completed"
    assert (tmp_path / "log" / "embeddings" / "tok-2.pt").is_file()
    clean_files(tmp_path)


def test_kill_9_between_pt_and_safetensors_and_the_lock(server, tiny_single, tmp_path, reference, capsys):
    """kill -9 from outside while the first segment's final save stands between NAME.pt (written)
    and NAME.safetensors (not yet); meanwhile a second trainer on the same log folder is refused,
    and after the kill the folder is not left locked."""
    child = Child(server, tmp_path, argv(tiny_single, tmp_path, steps=4), pause_write="st")
    child.wait("saving")
    rc, lines = run_cli(argv(tiny_single, tmp_path, "--resume", "--out", str(tmp_path / "out2")), capsys)
    assert rc == 2 and len(lines) == 1, lines
    assert "--log-dir" in lines[0] and "in use" in lines[0] and f"pid {child.pid}" in lines[0], lines
    assert not (tmp_path / "out2").exists()
    os.kill(child.pid, signal.SIGKILL)
    assert child.finish()[0] == -signal.SIGKILL
    assert read_pt(tmp_path / "out" / "tok.pt")[0] == 4 and not (tmp_path / "out" / "tok.safetensors").exists()
    res = train(quick_config(tiny_single, tmp_path, steps=4, resume=True))   # restores both
    assert res.status == "completed" and agreed_step(tmp_path) == 4
    clean_files(tmp_path)
    resume_to_end(tiny_single, tmp_path)
    same_as_reference(tmp_path, reference)


def test_plain_rerun_over_a_resumable_state_is_refused(tiny_single, tmp_path, capsys):
    train(quick_config(tiny_single, tmp_path, steps=2))
    rc, lines = run_cli(argv(tiny_single, tmp_path, "--out", str(tmp_path / "new-out")), capsys)
    assert rc == 2 and len(lines) == 1 and "--resume" in lines[0] and "--overwrite" in lines[0], lines
    assert not (tmp_path / "new-out").exists()


# ----------------------------------------------------------------------------- full disk

def _snapshot(tmp: Path) -> dict[str, bytes]:
    return {p: (tmp / p).read_bytes() for p in ("log/state.pt", "out/tok.pt", "out/tok.safetensors")}


def test_file_size_limit_during_the_save(server, tiny_single, tmp_path, reference):
    train(quick_config(tiny_single, tmp_path, steps=4))
    before = _snapshot(tmp_path)
    limit = (tmp_path / "log" / "state.pt").stat().st_size - 1       # the state no longer fits
    child = Child(server, tmp_path, argv(tiny_single, tmp_path, "--resume"), fsize=limit)
    rc, err = child.finish()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("ti-fast: error:") and "state.pt" in lines[0] and "intact" in lines[0], lines
    assert _snapshot(tmp_path) == before          # the previous state and pair, untouched
    clean_files(tmp_path)
    resume_to_end(tiny_single, tmp_path)          # nothing was lost
    same_as_reference(tmp_path, reference)


@pytest.mark.parametrize("target", ["state.pt", "tok.safetensors", "settings.json"])
def test_no_space_left_during_the_save(tiny_single, tmp_path, reference, capsys, monkeypatch, target):
    train(quick_config(tiny_single, tmp_path, steps=4))
    before = _snapshot(tmp_path)
    real_fsync = os.fsync

    def fsync(fd):                      # the disk fills while TARGET's temp file is flushed
        if os.readlink(f"/proc/self/fd/{fd}").split("/")[-1].startswith(f".{target}."):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    rc, lines = run_cli(argv(tiny_single, tmp_path, "--resume"), capsys)
    monkeypatch.undo()
    assert rc == 2 and len(lines) == 1 and target in lines[0] and "No space left" in lines[0], lines
    after = _snapshot(tmp_path)
    if target == "state.pt":
        assert after == before
    elif target == "tok.safetensors":   # the state went on to step N; the pair is the old one
        assert after["out/tok.safetensors"] == before["out/tok.safetensors"]
        assert torch.load(tmp_path / "log" / "state.pt", weights_only=True)["step"] == N
    else:                               # settings.json, at the first step: saved at the start
        assert agreed_step(tmp_path) == 4
    clean_files(tmp_path)
    resume_to_end(tiny_single, tmp_path)
    same_as_reference(tmp_path, reference)


def test_safetensors_past_a_file_size_limit_is_an_os_error(tmp_path):
    """NAME.safetensors is written like every other file: a full disk is an OSError naming it
    (DiskFullError in a run), not safetensors' own error, and the previous file stays."""
    from ti_fast.embeddings import Embedding, save_safetensors
    path = tmp_path / "e.safetensors"
    save_safetensors(Embedding(name="e", vectors=torch.zeros(2, 32), step=1), path)
    before, new = path.read_bytes(), Embedding(name="e", vectors=torch.ones(2, 32), step=2)

    def attempt():
        import resource
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64, resource.RLIM_INFINITY))
        try:
            save_safetensors(new, path)
        except OSError as e:
            return [e.errno, e.filename]
        except Exception as e:          # noqa: BLE001  (the failure this test is about)
            return [type(e).__name__, str(e)]
        return ["written", None]

    assert in_child(attempt) == [errno.EFBIG, str(path)]
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["e.safetensors"]


# ----------------------------------------------------------------------------- read-only folders

def test_read_only_output_folders_refused_before_the_model_loads(tiny_single, monkeypatch, capsys):
    from ti_fast.training import group
    base = Path(tempfile.mkdtemp(prefix="ti-fast-ro-"))
    try:
        base.chmod(0o1777)              # the unprivileged user may read the inputs, make out/ log/ ...
        quick_config(tiny_single, base)                   # images in base/imgs
        shutil.copytree(tiny_single, base / "model")
        (base / "ro").mkdir(mode=0o555)                   # ... and not write here
        (base / "ro").chmod(0o555)
        model = base / "model"
        cases = [(argv(model, base, "--out", str(base / "ro")), "--out"),
                 (argv(model, base, "--out", str(base / "ro" / "new")), "--out"),
                 (argv(model, base, "--log-dir", str(base / "ro")), "--log-dir"),
                 (argv(model, base, "--cache-dir", str(base / "ro" / "cache")), "--cache-dir"),
                 (["make-tiny", str(base / "ro" / "tiny")], "make-tiny")]

        def never(*a, **k):
            raise ConfigError("the model would load now")

        monkeypatch.setattr(group, "load_for_training", never)
        # the same path once here, writable: whatever it imports lazily is imported before the fork
        rc, lines = run_cli(argv(model, base, "--out", str(base / "ok"), "--log-dir", str(base / "ok")), capsys)
        assert rc == 2 and "would load now" in lines[0], lines
        for args, flag in cases:
            rc, err = main_as_nobody(args)
            lines = [ln for ln in err.splitlines() if ln.strip()]
            assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
            assert flag in lines[0] and "writable" in lines[0], lines
        assert list((base / "ro").iterdir()) == []
    finally:
        (base / "ro").chmod(0o755)
        shutil.rmtree(base)


# ----------------------------------------------------------------------------- a crash, an OOM

def _fail_at_step_3(monkeypatch, exc: BaseException) -> None:
    real, calls = step_mod.GroupStep.__call__, [0]

    def step(self, mbs):
        calls[0] += 1
        if calls[0] == 3:
            raise exc
        return real(self, mbs)

    monkeypatch.setattr(step_mod.GroupStep, "__call__", step)


def test_unexpected_exception_saves_and_points_at_the_traceback(tiny_single, tmp_path, capsys, monkeypatch):
    # a long message, as torch's shape errors are: the traceback's path must survive the cut
    _fail_at_step_3(monkeypatch, RuntimeError("boom: " + "shape mismatch " * 60))
    rc, lines = run_cli(argv(tiny_single, tmp_path), capsys)
    assert rc == 1 and len(lines) == 1, lines
    m = re.search(r"full traceback in (\S+\.txt)", lines[0])
    assert m and "RuntimeError" in lines[0] and "step 2" in lines[0], lines
    tb = Path(m.group(1))
    assert tb.parent == tmp_path / "log"
    text = tb.read_text()
    assert text.startswith("Traceback") and "RuntimeError: boom" in text and "test_faults.py" in text
    assert agreed_step(tmp_path) == 2
    clean_files(tmp_path)


def test_out_of_memory_saves_and_says_one_line(tiny_single, tmp_path, capsys, monkeypatch):
    _fail_at_step_3(monkeypatch, torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    rc, lines = run_cli(argv(tiny_single, tmp_path), capsys)
    assert rc == 2 and len(lines) == 1 and "out of memory" in lines[0] and "--batch-size" in lines[0], lines
    assert agreed_step(tmp_path) == 2
    clean_files(tmp_path)


# ----------------------------------------------------------------------------- --resume's settings

def test_resume_refuses_a_new_shape_and_lists_other_changes(tiny_single, tiny_diffusers, tmp_path, capsys):
    train(quick_config(tiny_single, tmp_path, steps=2))
    state = tmp_path / "log" / "state.pt"
    kept = state.read_bytes()
    for extra, word in ((["--vectors", "3"], "vectors"), (["--name", "other"], "name"),
                        (["--model", str(tiny_diffusers)], "model")):
        rc, lines = run_cli(argv(tiny_single, tmp_path, "--resume", *extra), capsys)
        assert rc == 2 and len(lines) == 1 and word in lines[0] and "--log-dir" in lines[0], lines
    # a single-file model is compared by its hash: a copy with one byte changed is refused ...
    changed = tmp_path / "changed"              # a make-tiny folder: model.safetensors + tokenizer/
    shutil.copytree(tiny_single, changed)
    data = bytearray((changed / "model.safetensors").read_bytes())
    data[-1] ^= 1
    (changed / "model.safetensors").write_bytes(bytes(data))
    rc, lines = run_cli(argv(tiny_single, tmp_path, "--resume", "--model", str(changed)), capsys)
    assert rc == 2 and len(lines) == 1 and "hash" in lines[0] and "--log-dir" in lines[0], lines
    d = torch.load(state, weights_only=True)
    d["kind"] = "hypernetwork"          # what is trained changed
    torch.save(d, state)
    rc, lines = run_cli(argv(tiny_single, tmp_path, "--resume"), capsys)
    assert rc == 2 and len(lines) == 1 and "hypernetwork" in lines[0], lines
    state.write_bytes(kept)
    assert state.read_bytes() == kept and agreed_step(tmp_path) == 2

    args = [a for a in argv(tiny_single, tmp_path, "--resume", steps=4) if a != "--quiet"]
    args[args.index("--lr") + 1] = "0.02"
    rc, lines = run_cli(args + ["--batch-size", "2"], capsys)
    assert rc == 0, lines
    notes = [ln for ln in lines if "changed settings" in ln]
    assert len(notes) == 1 and all(f in notes[0] for f in ("--lr", "--batch-size", "--steps")), lines
    s = json.loads((tmp_path / "log" / "settings.json").read_text())
    seg = s["segments"]
    assert [g["config"]["steps"] for g in seg] == [2, 4] and [g["start_step"] for g in seg] == [0, 2]
    assert seg[0]["config"]["lr"] == "0.01" and seg[1]["config"]["lr"] == "0.02"
    assert seg[1]["config"]["batch_size"] == 2 and s["config"] == seg[1]["config"]
    for g in (s, *seg):                 # what ran: no CUDA graph on the CPU, whatever was asked
        assert g["config"]["cuda_graph"] is True and g["ran"]["cuda_graph"] is False
        assert g["ran"]["device"] == "cpu"
    assert agreed_step(tmp_path) == 4
    # ... and a moved copy of the same model resumes, saying so
    moved = tmp_path / "moved"
    shutil.copytree(tiny_single, moved)
    rc, lines = run_cli([a for a in argv(moved, tmp_path, "--resume", steps=5) if a != "--quiet"], capsys)
    assert rc == 0 and any("same model at a new path" in ln for ln in lines), lines
    assert agreed_step(tmp_path) == 5
    clean_files(tmp_path)
