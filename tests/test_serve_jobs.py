"""`ti-fast serve` trains: upload -> job -> SSE progress -> download, bitwise equal to ti_fast.train().

Two concurrent jobs share one group and each ends as it does alone; cancel and resume; txt2img
between steps. A real uvicorn on a free loopback port, the tiny model."""
from __future__ import annotations

import io
from pathlib import Path

import pytest
from serve_helpers import (LiveServer, demo_files, job_config, read_events, require_serve, submit, upload,
                           wait_job)


@pytest.fixture(scope="module")
def live(tiny_single, tmp_path_factory):
    require_serve()
    srv = LiveServer(tmp_path_factory.mktemp("serve-home"), tiny_single, max_running=4)
    with srv.client() as c:
        r = upload(c, "rings")
        assert r.status_code == 201, r.text
    yield srv
    srv.stop()


def solo(model, home: Path, tmp: Path, config: dict):
    """The same run through ti_fast.train() (what `ti-fast train` runs), outputs elsewhere."""
    import ti_fast
    cfg = ti_fast.TrainConfig(model=str(model), device="cpu", quiet=True, out=str(tmp / "out"), log_dir=str(tmp / "log"),
                              **{**config, "data": str(home / "datasets" / config["data"])})
    res = ti_fast.train(cfg)
    return res


def vectors(data: bytes):
    import torch
    d = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    return d["string_to_param"]["*"], d["step"]


def test_upload_train_events_download_equals_a_cli_run(live, tiny_single, tmp_path):
    import torch
    config = job_config("srvone", "rings", steps=6, preview_every=3, preview_steps=2, preview_prompt="a ring")
    with live.client() as c:
        ds = c.get("/api/v1/datasets/rings").json()
        assert ds["images"] == 3 and ds["captions"] == 3
        job = submit(c, config)
        assert job["status"] in ("queued", "running") and job["config"]["data"] == "datasets/rings"
        events = read_events(c, job["id"])
        kinds = [e for e, _ in events]
        assert kinds[0] == "job" and kinds[-1] == "end" and "progress" in kinds
        steps = [d["step"] for e, d in events if e == "progress" and d.get("step") is not None]
        assert steps == sorted(steps) and max(steps) >= 5
        assert all(d["end_step"] == 6 for e, d in events if e == "progress" and d.get("end_step") is not None)
        previews = [d["preview"] for e, d in events if e == "progress" and d.get("preview")]
        assert previews, "no preview URL in the stream"
        img = c.get(previews[0])
        assert img.status_code == 200 and img.content[:8] == b"\x89PNG\r\n\x1a\n"
        end = events[-1][1]
        assert end["status"] == "completed" and end["step"] == 6
        done = c.get(f"/api/v1/jobs/{job['id']}").json()
        assert done["status"] == "completed" and done["step"] == 6 and done["group"]
        pt = c.get(done["files"]["embedding"])
        assert pt.status_code == 200 and "attachment" in pt.headers["content-disposition"]
        listed = {f["path"] for f in c.get(f"/api/v1/jobs/{job['id']}/files").json()}
        assert {"out/srvone.pt", "out/srvone.safetensors", "loss.csv", "settings.json"} <= listed
        loss = c.get(f"/api/v1/jobs/{job['id']}/loss").json()
        assert [r[0] for r in loss["rows"]] == [1, 2, 3, 4, 5, 6]
        assert [p["step"] for p in c.get(f"/api/v1/jobs/{job['id']}/previews").json()] == [3, 6]
        lib = {e["file"]: e for e in c.get("/api/v1/embeddings").json()}
        assert lib["srvone.pt"]["step"] == 6 and lib["srvone.pt"]["vectors"] == 2
    served, step = vectors(pt.content)
    ref = solo(tiny_single, live.home, tmp_path, config)
    alone, ref_step = vectors(ref.embedding.read_bytes())
    assert step == ref_step == 6
    assert torch.equal(served, alone), (served - alone).abs().max()


def test_two_concurrent_jobs_share_one_group_and_match_their_solo_runs(live, tiny_single, tmp_path):
    import torch
    a = job_config("srvpair_a", "rings", steps=60, seed=11, vectors=1)
    b = job_config("srvpair_b", "rings", steps=24, seed=12, lr="0.02", grad_accum=2)
    with live.client() as c:
        ja, jb = submit(c, a), submit(c, b)
        ja, jb = wait_job(c, ja["id"]), wait_job(c, jb["id"])
        assert ja["status"] == jb["status"] == "completed", (ja["error"], jb["error"])
        assert ja["groups"] == jb["groups"] and len(ja["groups"]) == 1      # one group ...
        assert ja["peak_runs"] == jb["peak_runs"] == 2 and ja["co_batched"]  # ... holding both at once
        got = [vectors(c.get(j["files"]["embedding"]).content) for j in (ja, jb)]
    for (served, step), config, sub in zip(got, (a, b), ("a", "b")):
        ref = solo(tiny_single, live.home, tmp_path / sub, config)
        alone, ref_step = vectors(ref.embedding.read_bytes())
        assert step == ref_step == config["steps"]
        assert torch.allclose(served, alone, rtol=1e-5, atol=1e-7), (served - alone).abs().max()


def test_cancel_saves_and_resume_continues(live):
    import torch
    with live.client() as c:
        job = submit(c, job_config("srvcancel", "rings", steps=5000))
        job = wait_job(c, job["id"], step=3)
        r = c.post(f"/api/v1/jobs/{job['id']}/cancel")
        assert r.status_code == 200
        job = wait_job(c, job["id"])
        assert job["status"] == "cancelled" and 3 <= job["step"] < 5000
        saved = torch.load(io.BytesIO(c.get(job["files"]["embedding"]).content), weights_only=True)
        assert saved["step"] == job["step"]
        assert c.post(f"/api/v1/jobs/{job['id']}/cancel").status_code == 409       # already over
        r = c.post(f"/api/v1/jobs/{job['id']}/resume")
        assert r.status_code == 200 and r.json()["resume"] is True
        again = wait_job(c, job["id"], step=job["step"] + 2)
        c.post(f"/api/v1/jobs/{job['id']}/cancel")
        again = wait_job(c, job["id"])
        assert again["status"] == "cancelled" and again["step"] > job["step"]


def test_a_second_job_writing_the_same_files_is_refused(live):
    with live.client() as c:
        job = submit(c, job_config("srvclash", "rings", steps=5000))
        r = c.post("/api/v1/jobs", json={"config": job_config("srvclash", "rings", overwrite=True)})
        assert r.status_code == 409 and "srvclash" in r.json()["error"]
        c.post(f"/api/v1/jobs/{job['id']}/cancel")
        assert wait_job(c, job["id"])["status"] == "cancelled"


def test_bad_job_settings_are_400_naming_the_key(live):
    with live.client() as c:
        for config, word in ((job_config("x1", "rings", precision="bf16"), "precision"),
                             (job_config("x2", "rings", model="/other.ckpt"), "model"),
                             (job_config("x3", "rings", no_such_key=1), "no_such_key"),
                             (job_config("x4", "rings", steps="many"), "steps"),
                             (job_config("x5", "rings", vectors=0), "vectors"),
                             (job_config("x6", "no-such-dataset"), "data")):
            r = c.post("/api/v1/jobs", json={"config": config})
            assert r.status_code in (400, 404), (config, r.text)
            assert word in r.json()["error"] and "\n" not in r.json()["error"], r.text
            if word != "no_such_key":
                assert r.json()["field"] == word, r.json()              # a form shows it beside that field


def test_txt2img_between_steps(live):
    with live.client() as c:
        r = c.post("/api/v1/embeddings", json={"name": "srvgenemb", "init_text": "ring", "vectors": 2})
        assert r.status_code == 201 and r.json()["step"] == 0 and r.json()["vectors"] == 2
        assert c.post("/api/v1/embeddings", json={"name": "srvgenemb"}).status_code == 409
        job = submit(c, job_config("srvgen", "rings", steps=5000))
        wait_job(c, job["id"], step=2)
        r = c.post("/api/v1/txt2img", json={"prompt": "a photo of srvgenemb", "steps": 2, "width": 64, "height": 64,
                                            "seed": 3, "batch": 2})
        assert r.status_code == 200, r.text
        imgs = r.json()["images"]
        assert [i["seed"] for i in imgs] == [3, 4] and "TI hashes" in imgs[0]["infotext"]
        png = c.get(imgs[0]["url"])
        assert png.status_code == 200 and png.content[:4] == b"\x89PNG"
        assert c.get(f"/api/v1/jobs/{job['id']}").json()["status"] == "running"      # training went on
        c.post(f"/api/v1/jobs/{job['id']}/cancel")
        wait_job(c, job["id"])


def test_hypernetwork_library(live):
    with live.client() as c:
        r = c.post("/api/v1/hypernetworks", json={"name": "srvhn", "layer_structure": "1,2,1", "activation": "relu",
                                                  "seed": 1})
        assert r.status_code == 201, r.text
        d = r.json()
        assert d["kind"] == "hypernetwork" and d["widths"] == [32, 64] and d["activation_func"] == "relu"
        assert c.post("/api/v1/hypernetworks", json={"name": "srvhn"}).status_code == 409
        assert c.post("/api/v1/hypernetworks", json={"name": "srvhn2", "activation": "nope"}).status_code == 400
        assert "srvhn.pt" in [h["file"] for h in c.get("/api/v1/hypernetworks").json()]
        r = c.post("/api/v1/txt2img", json={"prompt": "a ring <hypernet:srvhn:0.5>", "steps": 1, "width": 64,
                                            "height": 64, "seed": 1})
        assert r.status_code == 200 and "<hypernet:srvhn:0.5>" in r.json()["images"][0]["infotext"]
        assert c.get("/api/v1/hypernetworks/srvhn.pt").content[:2] == b"PK"       # a torch zip archive
        assert c.delete("/api/v1/hypernetworks/srvhn.pt").status_code == 200
        assert c.get("/api/v1/hypernetworks/srvhn.pt").status_code == 404


def test_datasets_list_add_delete(live):
    with live.client() as c:
        assert [s["key"] for s in c.get("/api/v1/samplers").json()][:2] == ["euler_a", "euler"]
        assert upload(c, "extra", demo_files(2, captions=False)).status_code == 201
        assert upload(c, "extra", demo_files(2, captions=False)).status_code == 409     # same names
        r = upload(c, "extra", demo_files(2, captions=False), replace="true")
        assert r.status_code == 201 and r.json()["images"] == 2
        assert "extra" in {d["name"] for d in c.get("/api/v1/datasets").json()}
        assert c.delete("/api/v1/datasets/extra").status_code == 200
        assert c.get("/api/v1/datasets/extra").status_code == 404


def test_max_running_queues_the_rest_until_a_place_frees(tiny_single, tmp_path):
    """--max-running 1: a second job waits in the queue while the first trains, then runs."""
    require_serve()
    srv = LiveServer(tmp_path / "home", tiny_single, max_running=1)
    try:
        with srv.client() as c:
            assert upload(c, "rings").status_code == 201
            first = submit(c, job_config("srvq_first", "rings", steps=5000))
            second = submit(c, job_config("srvq_second", "rings", steps=3))
            wait_job(c, first["id"], step=3)
            assert c.get(f"/api/v1/jobs/{second['id']}").json()["status"] == "queued"
            wait_job(c, first["id"], step=6)                       # still queued a few steps on
            assert c.get(f"/api/v1/jobs/{second['id']}").json()["status"] == "queued"
            assert c.post(f"/api/v1/jobs/{first['id']}/cancel").status_code == 200
            done = wait_job(c, second["id"])
            assert done["status"] == "completed" and done["step"] == 3 and done["peak_runs"] == 1
            assert wait_job(c, first["id"])["status"] == "cancelled"
    finally:
        srv.stop()


def test_errors_name_paths_under_home_as_HOME(live):
    (live.home / "datasets" / "srvempty").mkdir()                # no image: refused at submit
    with live.client() as c:
        r = c.post("/api/v1/jobs", json={"kind": "embedding", "config": job_config("srvempty", "srvempty")})
    assert r.status_code == 400 and "HOME/datasets/srvempty" in r.json()["error"], r.text
    assert str(live.home) not in r.text
