"""The /sdapi/v1 routes driven as A1111's API clients drive them, /train/embedding end to end.

Request bodies built from A1111 v1.10.1's field names (modules/api/models.py, the create/train
functions' parameters), responses checked for A1111's shapes."""
from __future__ import annotations

import base64
import io
import json
import threading
import time

import pytest
from serve_helpers import LiveServer, require_serve, upload


@pytest.fixture(scope="module")
def live(tiny_single, tmp_path_factory):
    require_serve()
    srv = LiveServer(tmp_path_factory.mktemp("a1111-home"), tiny_single)
    with srv.client() as c:
        assert upload(c, "rings").status_code == 201
    yield srv
    srv.stop()


def train_body(name: str, **kw) -> dict:
    """Every field of A1111's train_embedding(...), as its API clients send them."""
    body = {"id_task": "task(abc123)", "embedding_name": name, "learn_rate": "0.01", "batch_size": 1,
            "gradient_step": 1, "data_root": "rings", "log_directory": "textual_inversion", "training_width": 64,
            "training_height": 64, "varsize": False, "steps": 4, "clip_grad_mode": "disabled", "clip_grad_value": "0.1",
            "shuffle_tags": False, "tag_drop_out": 0, "latent_sampling_method": "once", "use_weight": False,
            "create_image_every": 0, "save_embedding_every": 0, "template_filename": "subject_filewords.txt",
            "save_image_with_stored_embedding": False, "preview_from_txt2img": False, "preview_prompt": "",
            "preview_negative_prompt": "", "preview_steps": 20, "preview_sampler_name": "Euler a",
            "preview_cfg_scale": 7.0, "preview_seed": -1.0, "preview_width": 512, "preview_height": 512}
    body.update(kw)
    return body


def test_create_then_train_embedding_end_to_end(live):
    import torch
    with live.client() as c:
        r = c.post("/sdapi/v1/create/embedding", json={"name": "a1ring", "num_vectors_per_token": 2,
                                                       "overwrite_old": False, "init_text": "ring"})
        assert r.status_code == 200 and r.json()["info"].startswith("create embedding filename: ")
        path = r.json()["info"].split("filename: ")[1]
        assert path.endswith("embeddings/a1ring.pt")
        again = c.post("/sdapi/v1/create/embedding", json={"name": "a1ring", "num_vectors_per_token": 2,
                                                           "overwrite_old": False, "init_text": "ring"})
        assert again.json()["info"].startswith("create embedding error: ")       # A1111: exists, not overwritten
        emb = c.get("/sdapi/v1/embeddings").json()
        assert set(emb) == {"loaded", "skipped"}
        assert emb["loaded"]["a1ring"] == {"step": 0, "sd_checkpoint": None, "sd_checkpoint_name": None,
                                           "shape": 32, "vectors": 2}
        r = c.post("/sdapi/v1/train/embedding", json=train_body("a1ring", varsize=True), timeout=300)
        assert r.status_code == 200
        info = r.json()["info"]
        assert info.startswith(f"train embedding complete: filename: {path} error: None"), info
        assert "varsize" in info                                                   # accepted, not honoured
        assert c.get("/sdapi/v1/embeddings").json()["loaded"]["a1ring"]["step"] == 4
        d = torch.load(path, weights_only=True)
        assert d["step"] == 4 and d["name"] == "a1ring" and d["string_to_param"]["*"].shape == (2, 32)
        # a second request continues from the file's step (steps is the total, as in A1111)
        r = c.post("/sdapi/v1/train/embedding", json=train_body("a1ring", steps=6), timeout=300)
        assert "error: None" in r.json()["info"]
        assert c.get("/sdapi/v1/embeddings").json()["loaded"]["a1ring"]["step"] == 6
        jobs = [j for j in c.get("/api/v1/jobs").json() if j["origin"] == "sdapi"]
        assert [j["status"] for j in jobs] == ["completed", "completed"]
        assert all(j["config"]["log_dir"].startswith("logs/textual_inversion/") for j in jobs)


def test_train_errors_come_back_in_info(live):
    with live.client() as c:
        r = c.post("/sdapi/v1/train/embedding", json=train_body("nosuchembedding"))
        assert r.status_code == 200 and "not found" in r.json()["info"] and "error: " in r.json()["info"]
        c.post("/sdapi/v1/create/embedding", json={"name": "a1err", "num_vectors_per_token": 1, "overwrite_old": True})
        r = c.post("/sdapi/v1/train/embedding", json=train_body("a1err", learn_rate="fast"))
        assert r.status_code == 200 and "learning rate" in r.json()["info"]
        r = c.post("/sdapi/v1/train/embedding", json=train_body("a1err", data_root="../../etc"))
        assert r.status_code == 400                                               # a path outside HOME: refused
        r = c.post("/sdapi/v1/train/embedding", json=train_body("a1err", template_filename="nosuch.txt"))
        assert r.status_code == 404 or "template" in r.json().get("info", r.text)


def test_progress_and_interrupt_during_a_train_request(live):
    import torch
    with live.client() as c:
        c.post("/sdapi/v1/create/embedding", json={"name": "a1long", "num_vectors_per_token": 1,
                                                   "overwrite_old": True, "init_text": "ring"})
        assert c.get("/sdapi/v1/progress").json()["state"]["job_count"] == 0
        answer = {}
        t = threading.Thread(target=lambda: answer.update(
            r=live.client().post("/sdapi/v1/train/embedding", json=train_body("a1long", steps=100000), timeout=300)))
        t.start()
        deadline = time.monotonic() + 60
        while True:
            p = c.get("/sdapi/v1/progress").json()
            if p["state"]["job_no"] >= 2:
                break
            assert time.monotonic() < deadline, p
            time.sleep(0.05)
        assert set(p) == {"progress", "eta_relative", "state", "current_image", "textinfo"}
        assert p["state"]["job"] == "train_embedding" and p["state"]["job_count"] == 100000
        assert 0 < p["progress"] < 1 and "Step:" in p["textinfo"]
        assert c.post("/sdapi/v1/interrupt").json() == {}
        t.join(60)
        assert not t.is_alive()
        info = answer["r"].json()["info"]
        assert "error: None" in info
        step = torch.load(live.home / "embeddings" / "a1long.pt", weights_only=True)["step"]
        assert 2 <= step < 100000
        assert c.get("/sdapi/v1/embeddings").json()["loaded"]["a1long"]["step"] == step


def test_txt2img_png_info_and_lists(live):
    with live.client() as c:
        body = {"prompt": "a photo of a ring", "negative_prompt": "blurry", "seed": 5, "sampler_name": "Euler a",
                "batch_size": 1, "n_iter": 2, "steps": 2, "cfg_scale": 7, "width": 64, "height": 64,
                "restore_faces": True, "enable_hr": True, "override_settings": {"CLIP_stop_at_last_layers": 2},
                "send_images": True, "save_images": False}
        r = c.post("/sdapi/v1/txt2img", json=body)
        assert r.status_code == 200, r.text
        out = r.json()
        assert set(out) == {"images", "parameters", "info"} and len(out["images"]) == 2
        info = json.loads(out["info"])
        assert info["all_seeds"] == [5, 6] and info["seed"] == 5 and info["sampler_name"] == "Euler a"
        assert info["clip_skip"] == 2 and len(info["infotexts"]) == 2
        assert "enable_hr" in info["ignored"] and "restore_faces" in info["ignored"]
        assert out["parameters"]["prompt"] == "a photo of a ring" and out["parameters"]["steps"] == 2
        from PIL import Image
        png = base64.b64decode(out["images"][1])
        assert "Seed: 6" in Image.open(io.BytesIO(png)).info["parameters"]
        assert not list((live.home / "outputs").glob("*.png"))               # save_images false
        for image in (out["images"][0], "data:image/png;base64," + out["images"][0]):
            pi = c.post("/sdapi/v1/png-info", json={"image": image}).json()
            assert set(pi) == {"info", "items", "parameters"}
            assert pi["info"] == info["infotexts"][0]
            assert pi["parameters"]["Seed"] == "5" and pi["parameters"]["Size-1"] == "64"
            assert pi["parameters"]["Prompt"] == "a photo of a ring" and pi["parameters"]["Clip skip"] == "2"
        assert c.post("/sdapi/v1/png-info", json={"image": "bm90IGFuIGltYWdl"}).status_code == 400
        names = [s["name"] for s in c.get("/sdapi/v1/samplers").json()]
        assert {"Euler a", "Euler", "DDIM", "DPM++ 2M"} <= set(names)
        models = c.get("/sdapi/v1/sd-models").json()
        assert len(models) == 1 and set(models[0]) == {"title", "model_name", "hash", "sha256", "filename", "config"}
        assert c.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == models[0]["title"]
        r = c.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 1, "width": 64, "height": 64,
                                              "override_settings": {"sd_model_checkpoint": models[0]["title"]}})
        assert r.status_code == 200 and "override_settings.sd_model_checkpoint" not in json.loads(r.json()["info"])["ignored"]
        for bad, word in (({"override_settings": ["CLIP_stop_at_last_layers", 2]}, "override_settings"),
                          ({"subseed": "abc"}, "abc"), ({"seed": "x"}, "x"), ({"n_iter": 101}, "n_iter")):
            r = c.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 1, "width": 64, "height": 64, **bad})
            assert r.status_code == 400 and word in r.json()["detail"], (bad, r.status_code, r.text)


def test_create_and_train_hypernetwork(live):
    with live.client() as c:
        r = c.post("/sdapi/v1/create/hypernetwork", json={
            "name": "a1hyper", "enable_sizes": ["32", "64"], "overwrite_old": False, "layer_structure": "1,2,1",
            "activation_func": "relu", "weight_init": "XavierUniform", "add_layer_norm": False, "use_dropout": False,
            "dropout_structure": "0,0,0"})
        assert r.json()["info"].startswith("create hypernetwork filename: "), r.json()
        listed = c.get("/sdapi/v1/hypernetworks").json()
        assert {"name": "a1hyper", "path": str(live.home / "hypernetworks" / "a1hyper.pt")} in listed
        from ti_fast.hypernetworks import read_hypernetwork
        hn = read_hypernetwork(live.home / "hypernetworks" / "a1hyper.pt")
        assert sorted(hn.widths) == [32, 64] and hn.structure.activation == "relu"
        body = {k.replace("embedding", "hypernetwork"): v for k, v in train_body("a1hyper", steps=2).items()
                if k != "save_image_with_stored_embedding"}
        r = c.post("/sdapi/v1/train/hypernetwork", json=body, timeout=300)
        assert r.status_code == 200
        assert "error: None" in r.json()["info"], r.json()
        assert read_hypernetwork(live.home / "hypernetworks" / "a1hyper.pt").step == 2
