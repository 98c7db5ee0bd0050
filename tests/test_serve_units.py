"""The server's parts without a server: job store, paths inside HOME, zips, events, A1111 fields.

The job store (WAL, one winner per transition, recovery after a crash), path resolution inside
HOME, zip checks, the event hub, and the A1111 field mapping (every field of A1111's
train_embedding lands on the TrainConfig key the README names)."""
from __future__ import annotations

import asyncio
import os
import sqlite3
import threading
import zipfile
from pathlib import Path

import pytest

from serve_helpers import require_serve

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------- store

def _job(store, **kw):
    d = dict(job_id=store.new_id(), kind="embedding", origin="api", name="n", config={"out": "/o", "log_dir": "/l"},
             log_dir="/l", out_dir="/o")
    d.update(kw)
    return store.add(**d)


def test_store_is_wal_and_one_transition_wins(tmp_path):
    from ti_fast.serve.store import JobStore
    store = JobStore(tmp_path / "jobs.sqlite")
    assert sqlite3.connect(tmp_path / "jobs.sqlite").execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    jobs = [_job(store, name=f"n{i}") for i in range(20)]
    wins = []

    def race(target):
        for j in jobs:
            if store.transition(j["id"], ("queued",), target):
                wins.append((j["id"], target))
    threads = [threading.Thread(target=race, args=(t,)) for t in ("running", "cancelled", "running")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(w[0] for w in wins) == sorted(j["id"] for j in jobs)          # exactly one winner each
    assert {store.get(i)["status"] for i, _ in wins} <= {"running", "cancelled"}
    store.update(jobs[0]["id"], files={"embedding": "out/n0.pt"}, groups=["g1"])
    got = store.get(jobs[0]["id"])
    assert got["files"] == {"embedding": "out/n0.pt"} and got["groups"] == ["g1"] and got["config"]["out"] == "/o"
    store.close()


def test_store_recovery_queues_running_and_interrupted_again(tmp_path):
    from ti_fast.serve.store import JobStore
    store = JobStore(tmp_path / "jobs.sqlite")
    a, b, c, d = (_job(store, name=x) for x in "abcd")
    store.transition(a["id"], ("queued",), "running")
    store.transition(b["id"], ("queued",), "interrupted")
    store.transition(c["id"], ("queued",), "cancelled")
    store.close()                                       # (a kill -9 leaves the same file)
    store = JobStore(tmp_path / "jobs.sqlite")
    ids = store.recover(lambda job: job["name"] == "a")
    assert sorted(ids) == sorted([a["id"], b["id"]])
    assert [store.get(x["id"])["status"] for x in (a, b, c, d)] == ["queued", "queued", "cancelled", "queued"]
    assert store.get(a["id"])["resume"] == 1 and store.get(b["id"])["resume"] == 0
    assert store.delete(c["id"]) and not store.delete(a["id"])                 # only finished jobs go


# ---------------------------------------------------------------------------- home

def test_paths_stay_inside_home(tmp_path):
    from ti_fast.serve.errors import NotFound, PathRefused
    from ti_fast.serve.home import Home, safe_name
    home = Home(tmp_path / "home")
    (home.dir("datasets") / "cats" / "sub").mkdir(parents=True)
    os.symlink(tmp_path, home.dir("datasets") / "link")
    os.symlink(tmp_path, home.dir("datasets") / "cats" / "inner")
    assert home.inside("datasets", "cats", "data", must_exist="folder") == home.dir("datasets") / "cats"
    assert home.inside("datasets", str(home.dir("datasets") / "cats"), "data") == home.dir("datasets") / "cats"
    assert home.inside("logs", "a/b", "log_dir") == home.dir("logs") / "a" / "b"               # may not exist yet
    for bad in ("../x", "cats/../../x", "/etc", str(tmp_path), "link", "link/x", "cats/inner/x", "%2e%2e/x",
                "ca%74s", "cats\\..", "a\x00b", "", ".", str(home.root) + "/../x"):
        with pytest.raises(PathRefused):
            home.inside("datasets", bad, "data")
    for own in (home.dir("tmp") / "x", home.db_path, Path(str(home.db_path) + "-wal")):
        with pytest.raises(PathRefused):
            home.inside("logs", str(own), "log_dir")                  # the server's own files
    with pytest.raises(NotFound):
        home.inside("datasets", "dogs", "data", must_exist="folder")
    for bad in ("../a", "a/b", ".hidden", " lead", "a%2fb", "", "x" * 200, "semi;colon"):
        with pytest.raises(PathRefused):
            safe_name(bad, "name")
    assert safe_name("my set-1.v2", "name") == "my set-1.v2"
    with pytest.raises(PathRefused):
        home.below(home.dir("datasets") / "cats", "inner/f", "path")


def test_a_job_saved_at_its_end_counts_as_completed(tiny_single, tmp_path):
    """A server killed after a run's final save but before recording it: on restart the job is
    complete, not a failed resume ("nothing to do")."""
    import ti_fast
    from train_helpers import quick_config
    from ti_fast.serve.jobs import ended_in_state
    cfg = quick_config(tiny_single, tmp_path, steps=3)
    ti_fast.train(cfg)
    job = {"resume": 1, "log_dir": cfg.log_dir, "config": {"lr": cfg.lr, "steps": 3}}
    assert ended_in_state(job) == 3
    assert ended_in_state({**job, "config": {"lr": cfg.lr, "steps": 5}}) is None       # more to do: resume
    assert ended_in_state({**job, "resume": 0}) is None


# ---------------------------------------------------------------------------- zips

def test_zip_checks_come_before_extraction(tmp_path):
    require_serve()                     # uploads parse multipart bodies with python-multipart
    from ti_fast.serve import uploads as U
    from ti_fast.serve.errors import HTTPRefusal, TooLarge
    limits = U.Limits(max_upload=1 << 20, max_file=1 << 19, max_files=5, max_pixels=1 << 20)

    def z(entries, name="t.zip"):
        p = tmp_path / name
        with zipfile.ZipFile(p, "w") as f:
            for n, data in entries:
                f.writestr(n, data)
        return p
    keep, skipped = U.check_zip(z([("a/b.png", b"x"), ("a/b.txt", b"y"), ("notes.md", b"z"), ("__MACOSX/._b", b"")]),
                                "t.zip", limits)
    assert [rel for _, rel in keep] == ["a/b.png", "a/b.txt"] and skipped == ["notes.md"]
    for entries, err in (([("../x.png", b"")], HTTPRefusal), ([("/x.png", b"")], HTTPRefusal),
                         ([("a/../../x.png", b"")], HTTPRefusal), ([(f"{i}.png", b"") for i in range(6)], TooLarge),
                         ([("big.png", b"\0" * (600 << 10))], TooLarge),
                         ([("a.png", b"\0" * (400 << 10)), ("b.png", b"\0" * (400 << 10)),
                           ("c.png", b"\0" * (400 << 10))], TooLarge),
                         ([("a b?.png", b""), ("a b_.png", b"")], HTTPRefusal)):
        with pytest.raises(err):
            U.check_zip(z(entries), "t.zip", limits)
    assert not [p for p in tmp_path.rglob("*") if p.suffix != ".zip"]           # checks write nothing
    with pytest.raises(HTTPRefusal):
        (tmp_path / "junk.zip").write_bytes(b"not a zip")
        U.check_zip(tmp_path / "junk.zip", "junk.zip", limits)


def test_stored_names_keep_pairs_and_refuse_paths():
    require_serve()                     # uploads parse multipart bodies with python-multipart
    from ti_fast.serve.errors import HTTPRefusal
    from ti_fast.serve.uploads import stored_name
    assert stored_name("IMG (1).jpg") == "IMG _1_.jpg" and stored_name("IMG (1).txt") == "IMG _1_.txt"
    for bad in ("../a.png", "a/b.png", "a\\b.png", ".a.png", "..", ""):
        with pytest.raises(HTTPRefusal):
            stored_name(bad)


# ---------------------------------------------------------------------------- events

def test_hub_wakes_waiters_across_threads_and_forgets_old_jobs():
    from ti_fast.serve import events as E
    hub = E.Hub()

    async def main():
        w = hub.waiter("j1")
        threading.Timer(0.05, lambda: hub.publish("j1", {"step": 1})).start()
        assert await w.wait(5)
        assert [d for _, _, d in hub.since("j1", 0)] == [{"step": 1}]
        assert not await w.wait(0.05)                     # nothing more
        threading.Timer(0.05, hub.close).start()
        assert await w.wait(5) and hub.closed
        w.close()
    asyncio.run(main())
    for i in range(E.KEEP_ENDED + 5):
        hub.publish(f"old{i}", {}, "end")
    assert hub.since("old0", 0) == [] and hub.since(f"old{E.KEEP_ENDED + 4}", 0)
    assert E.sse("progress", {"a": 1}, 7) == b'id: 7\nevent: progress\ndata: {"a":1}\n\n'


# ---------------------------------------------------------------------------- A1111 fields

def test_a1111_train_fields_map_to_train_config():
    from ti_fast.serve import a1111 as A
    from ti_fast.training.config import FIELDS
    name, run, ignored = A.train_settings({
        "id_task": "t", "embedding_name": "cat", "learn_rate": 0.004, "batch_size": 2, "gradient_step": 3,
        "data_root": "d", "log_directory": "l", "training_width": 448, "training_height": 320, "varsize": True,
        "steps": 900, "clip_grad_mode": "norm", "clip_grad_value": "0.1:100, 0.05", "shuffle_tags": True,
        "tag_drop_out": 0.1, "latent_sampling_method": "random", "use_weight": True, "create_image_every": 50,
        "save_embedding_every": 100, "template_filename": "subject_filewords.txt",
        "save_image_with_stored_embedding": True, "preview_from_txt2img": True, "preview_prompt": "a cat",
        "preview_negative_prompt": "dog", "preview_steps": 12, "preview_sampler_name": "DPM++ 2M",
        "preview_cfg_scale": 5.5, "preview_seed": 42, "preview_width": 512, "preview_height": 512,
        "mystery": 1}, "embedding")
    assert name == "cat" and set(run) <= set(FIELDS)
    assert run == {"name": "cat", "lr": "0.004", "batch_size": 2, "grad_accum": 3, "width": 448, "height": 320,
                   "steps": 900, "clip_grad": "norm:0.1:100, 0.05", "shuffle_tags": True, "tag_dropout": 0.1,
                   "latents": "random", "alpha_weight": True, "preview_every": 50, "save_every": 100,
                   "template": "subject_filewords", "png_embed": True, "preview_prompt": "a cat",
                   "preview_negative": "dog", "preview_steps": 12, "preview_cfg": 5.5, "preview_seed": 42,
                   "preview_sampler": "dpmpp_2m"}
    assert any(i.startswith("varsize") for i in ignored) and any(i.startswith("mystery") for i in ignored)
    assert any(i.startswith("preview_width") for i in ignored)
    _, run, _ = A.train_settings({"hypernetwork_name": "h", "preview_from_txt2img": False}, "hypernetwork")
    assert run["lr"] == A.HYPERNETWORK_LR and "png_embed" not in run and "preview_prompt" not in run
    with pytest.raises(ValueError):
        A.train_settings({"learn_rate": "0.1"}, "embedding")


def test_a1111_txt2img_fields():
    from ti_fast.serve import a1111 as A
    gen, req, n_iter, ignored = A.txt2img_settings(
        {"prompt": "p", "sampler_name": "DPM++ 2M", "scheduler": "Uniform", "seed": 9, "batch_size": 2, "n_iter": 3,
         "enable_hr": True, "tiling": False, "override_settings": {"CLIP_stop_at_last_layers": 2, "sd_vae": "x",
                                                                   "sd_model_checkpoint": "m.safetensors [abc]"}},
        "m.safetensors [abc]", "m")
    assert gen == {"prompt": "p", "negative_prompt": "", "sampler": "dpmpp_2m", "karras": False, "steps": 50,
                   "cfg": 7.0, "seed": 9, "width": 512, "height": 512, "batch": 2, "clip_skip": 2}
    assert n_iter == 3 and req["steps"] == 50 and req["sampler_index"] == "Euler"
    assert ignored == ["enable_hr", "override_settings.sd_vae"]
    gen, _, _, ignored = A.txt2img_settings({"sampler_name": "LMS", "seed": -1}, "t", "m")
    assert gen["sampler"] == "euler" and 0 <= gen["seed"] < 2**32 and ignored[0].startswith("sampler_name 'LMS'")
    assert A.png_info_parameters("p\nSteps: 2, Size: 64x32, Seed: 5") == {
        "Prompt": "p", "Negative prompt": "", "Steps": "2", "Size-1": "64", "Size-2": "32", "Seed": "5"}
    assert A.decode_image_field("data:image/png;base64,aGk=") == b"hi" == A.decode_image_field("aGk=")
    with pytest.raises(ValueError):
        A.decode_image_field("http://example.com/x.png")


def test_readme_maps_every_a1111_train_field():
    from ti_fast.serve import a1111 as A
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## `ti-fast serve`"):]
    section = section[:section.index("\n## ", 5)]
    missing = [f for f in sorted(A.TRAIN_FIELDS) if f"`{f}`" not in section]
    assert not missing, f"README's serve section does not map {missing}"
    for route in ("/sdapi/v1/txt2img", "/sdapi/v1/png-info", "/sdapi/v1/embeddings", "/sdapi/v1/hypernetworks",
                  "/sdapi/v1/samplers", "/sdapi/v1/sd-models", "/sdapi/v1/options", "/sdapi/v1/progress",
                  "/sdapi/v1/interrupt", "/sdapi/v1/create/embedding", "/sdapi/v1/train/embedding",
                  "/sdapi/v1/create/hypernetwork", "/sdapi/v1/train/hypernetwork"):
        assert route in section, route
