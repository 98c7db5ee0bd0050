"""A1111-compatible routes under /sdapi/v1: v1.10.1's paths, request fields and response shapes.

Scripts written for A1111's API (webuiapi and friends) work against `ti-fast serve`.

As in A1111, /train/* queue the job and answer when it ends; /progress reports the oldest running
/sdapi job; /interrupt stops the /sdapi jobs (each saves first). Training and creation errors come
back as A1111 does, in `info` with status 200; refusals of paths outside HOME are 4xx. The field
mapping lives in a1111.py.
"""
from __future__ import annotations

import asyncio
import base64
import datetime
import shutil
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Body
from fastapi.concurrency import run_in_threadpool

from ..errors import UserError, one_line
from . import a1111 as A
from . import jobs as J
from .api_library import generate_call
from .errors import HTTPRefusal, PathRefused
from .store import TERMINAL


def router(state) -> APIRouter:
    r = APIRouter(prefix="/sdapi/v1")
    home, store = state.home, state.store

    def model_title() -> tuple[str, str]:
        info = state.model_info
        item = A.model_item(info)
        return item["title"], info.name

    # ------------------------------------------------------------------ generation
    @r.post("/txt2img", summary="A1111 txt2img: images as base64 PNGs with infotext, `info` a JSON string")
    async def txt2img(body: dict[str, Any] = Body(...)):
        title, name = model_title()
        try:
            gen, req, n_iter, ignored = A.txt2img_settings(body, title, name)
        except (TypeError, ValueError) as e:
            raise HTTPRefusal(f"txt2img: {one_line(e)}") from None
        save = bool(req.get("save_images"))
        out = home.dir("outputs") if save else home.tmpdir("txt2img-")
        try:
            def run(model):
                results = []
                for i in range(n_iter):
                    results.append(generate_call(state, {**gen, "seed": gen["seed"] + i * gen["batch"]}, out)(model))
                return results
            results = await asyncio.wrap_future(state.worker.call(run))
            paths = [p for res in results for p in res.paths]
            seeds = [s for res in results for s in res.seeds]
            infotexts = [t for res in results for t in res.infotexts]
            images = [base64.b64encode(p.read_bytes()).decode() for p in paths] if req.get("send_images", True) else []
        finally:
            if not save:
                shutil.rmtree(out, ignore_errors=True)
        from ..diffusion.samplers import SAMPLERS
        stamp = datetime.datetime.now().strftime("%Y%m%d%H%M%S")
        info = A.txt2img_info(req, gen, seeds, infotexts, state.model_info, SAMPLERS[gen["sampler"]].label,
                              ignored, stamp)
        return {"images": images, "parameters": req, "info": info}

    @r.post("/png-info", summary="The infotext of a PNG (base64 or data: URL)")
    def png_info(body: dict[str, Any] = Body(...)):
        from ..images import open_image
        from ..infotext import PARAMETERS_KEY
        try:
            data = A.decode_image_field(body.get("image", ""))
        except ValueError as e:
            raise HTTPRefusal(f"image: {e}") from None
        if len(data) == 0:
            return {"info": "", "items": {}, "parameters": {}}
        tmp = home.tmpdir("png-info-")
        try:
            p = tmp / "image"
            p.write_bytes(data)
            try:
                im = open_image(p, max_pixels=state.settings.max_pixels, transpose=False)
            except UserError:
                raise HTTPRefusal("image: not a readable image") from None
            info_items = {k: v for k, v in im.info.items() if isinstance(k, str) and isinstance(v, str)}
            im.close()
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        geninfo = info_items.pop(PARAMETERS_KEY, None) or ""
        return {"info": geninfo, "items": info_items, "parameters": A.png_info_parameters(geninfo) if geninfo else {}}

    # ------------------------------------------------------------------ lists
    @r.get("/samplers", summary="SamplerItem list")
    def samplers():
        return A.sampler_items()

    @r.get("/sd-models", summary="SDModelItem list (the one loaded model)")
    def sd_models():
        return [A.model_item(state.model_info)]

    @r.get("/options", summary="The few A1111 options that mean something here")
    def options():
        title, _ = model_title()
        return {"sd_model_checkpoint": title, "sd_checkpoint_hash": None, "sd_vae": "Automatic",
                "CLIP_stop_at_last_layers": 1, "samples_format": "png", "outdir_txt2img_samples": "outputs",
                "training_xattention_optimizations": True, "save_training_settings_to_txt": True,
                "training_write_csv_every": 1, "embeddings_dir": "embeddings", "hypernetwork_dir": "hypernetworks"}

    @r.get("/hypernetworks", summary="HypernetworkItem list")
    def hypernetworks():
        return [{"name": p.stem, "path": str(p)} for p in home.files("hypernetworks", (".pt",))]

    @r.get("/embeddings", summary="EmbeddingsResponse: loaded (fit the model) and skipped")
    def embeddings():
        from .api_library import EMBEDDING_EXTS, describe_file
        width = state.worker.group.model.text_encoder.config.width
        loaded, skipped = {}, {}
        for p in home.files("embeddings", EMBEDDING_EXTS):
            d = describe_file(p, "")
            if d.get("error") or d.get("kind") != "embedding" or d.get("name") in loaded or d.get("name") in skipped:
                continue
            (loaded if d.get("width") == width else skipped)[d["name"]] = A.embedding_item(d)
        return {"loaded": loaded, "skipped": skipped}

    # ------------------------------------------------------------------ progress, interrupt
    @r.get("/progress", summary="ProgressResponse of the oldest running /sdapi job")
    def progress(skip_current_image: bool = False):
        running = store.list(status=("running",), origin="sdapi", limit=1)
        base = {"skipped": False, "interrupted": False, "stopping_generation": False, "job": "", "job_count": 0,
                "job_timestamp": "0", "job_no": 0, "sampling_step": 0, "sampling_steps": 0}
        if not running:
            return {"progress": 0, "eta_relative": 0, "state": base, "current_image": None, "textinfo": None}
        job = running[0]
        ev = state.worker.last.get(job["id"], {})
        step, end = ev.get("step") or job["step"] or 0, ev.get("end_step") or job["end_step"] or 0
        stamp = datetime.datetime.fromtimestamp(job["started"] or job["created"]).strftime("%Y%m%d%H%M%S")
        st = {**base, "job": f"train_{job['kind']}", "job_count": end, "job_no": step, "job_timestamp": stamp}
        image = None
        if not skip_current_image:
            previews = sorted((Path(job["log_dir"]) / "images").glob(f"{job['name']}-*.png"),
                              key=lambda p: p.stat().st_mtime)
            previews = [p for p in previews if not p.is_symlink() and not p.name.endswith("-grid.png")]
            image = base64.b64encode(previews[-1].read_bytes()).decode() if previews else None
        loss = ev.get("loss", job["loss"])
        return {"progress": min(1.0, step / end) if end else 0.01, "eta_relative": ev.get("eta_s") or 0,
                "state": st, "current_image": image,
                "textinfo": f"Loss: {loss:.7f} Step: {step}/{end}" if loss is not None else f"Step: {step}/{end}"}

    @r.post("/interrupt", summary="Stop the /sdapi jobs (each saves at its next step)")
    def interrupt():
        for job in store.list(status=("queued", "running"), origin="sdapi"):
            if not store.transition(job["id"], ("queued",), "cancelled"):
                state.worker.cancel(job["id"])
            else:
                state.hub.publish(job["id"], {"job": job["id"], "status": "cancelled"}, "end")
        return {}

    # ------------------------------------------------------------------ create
    @r.post("/create/embedding", summary="create_embedding(name, num_vectors_per_token, overwrite_old, init_text)")
    def create_embedding(body: dict[str, Any] = Body(...)):
        from ..embeddings import create_embedding_file, sanitize_name
        try:
            name = sanitize_name(str(body.get("name") or ""))
            home.child("embeddings", f"{name}.pt", "name")
            path = create_embedding_file(name, state.settings.model, home.dir("embeddings"),
                                         init_text=str(body.get("init_text") or "*"),
                                         vectors=int(body.get("num_vectors_per_token") or 1),
                                         tokenizer=state.settings.process.get("tokenizer"),
                                         overwrite=bool(body.get("overwrite_old")))
        except (UserError, ValueError, TypeError) as e:
            return {"info": f"create embedding error: {one_line(e)}"}
        return {"info": f"create embedding filename: {path}"}

    @r.post("/create/hypernetwork", summary="create_hypernetwork(name, enable_sizes, overwrite_old, layer_structure, ...)")
    def create_hypernetwork(body: dict[str, Any] = Body(...)):
        from ..hypernetworks import INITS, sanitize_name
        from .api_library import new_hypernetwork_file
        try:
            name = sanitize_name(str(body.get("name") or ""))
            path = home.child("hypernetworks", f"{name}.pt", "name")
            ls = body.get("layer_structure") or "1,2,1"
            ls = ",".join(str(x) for x in ls) if isinstance(ls, (list, tuple)) else str(ls)
            n = len([x for x in ls.split(",") if x.strip()])
            ds = body.get("dropout_structure")
            ds = ",".join(str(x) for x in ds) if isinstance(ds, (list, tuple)) else ds
            init = {v.lower(): k for k, v in INITS.items()}.get(str(body.get("weight_init") or "Normal").lower(),
                                                               str(body.get("weight_init")).lower())
            new_hypernetwork_file(state, path, {
                "sizes": [int(s) for s in body.get("enable_sizes") or [768, 320, 640, 1280]],
                "layer_structure": ls, "activation": body.get("activation_func") or "linear", "init": init,
                "layer_norm": bool(body.get("add_layer_norm")),
                # A1111: the dropout structure counts only with use_dropout, else no dropout at all
                "dropout_structure": ds if body.get("use_dropout") and ds else ",".join(["0"] * n),
                "overwrite": bool(body.get("overwrite_old"))})
        except (UserError, ValueError, TypeError) as e:
            return {"info": f"create hypernetwork error: {one_line(e)}"}
        return {"info": f"create hypernetwork filename: {path}"}

    # ------------------------------------------------------------------ train
    async def train(kind: str, body: dict) -> dict:
        try:
            job_id, run, ignored = await run_in_threadpool(train_run, state, kind, body)
            job = await run_in_threadpool(J.submit, state, kind=kind, origin="sdapi", job_id=job_id, run=run,
                                          request=body, ignored=ignored)
        except PathRefused:
            raise
        except (UserError, ValueError, TypeError) as e:
            return {"info": A.train_info(kind, "", one_line(e), [])}
        job = await wait_for_end(state, job["id"])
        filename = Path(run["out"]) / f"{job['name']}.pt"
        return {"info": A.train_info(kind, str(filename), job["error"], ignored)}

    @r.post("/train/embedding", summary="train_embedding(id_task, embedding_name, learn_rate, ...): answers when it ends")
    async def train_embedding(body: dict[str, Any] = Body(...)):
        return await train("embedding", body)

    @r.post("/train/hypernetwork", summary="train_hypernetwork(id_task, hypernetwork_name, ...): answers when it ends")
    async def train_hypernetwork(body: dict[str, Any] = Body(...)):
        return await train("hypernetwork", body)

    return r


def train_run(state, kind: str, body: dict) -> tuple[str, dict, list[str]]:
    """An A1111 train request -> (job id, the run's TrainConfig keys, fields not honoured). The
    file trained in place is HOME/embeddings/NAME.(pt|safetensors|bin) or HOME/hypernetworks/NAME.pt."""
    home = state.home
    name, run, ignored = A.train_settings(body, kind)
    if not str(body.get("data_root") or ""):
        raise ValueError("Dataset directory is empty (data_root)")
    data = home.inside("datasets", str(body["data_root"]), "data_root", must_exist="folder")
    log_base = home.inside("logs", str(body.get("log_directory") or A.TRAIN_DEFAULTS["log_directory"]), "log_directory")
    lib = J.LIBRARY[kind]
    exts = (".pt", ".safetensors", ".bin") if kind == "embedding" else (".pt",)
    found = [p for p in (home.child(lib, f"{name}{e}", f"{kind}_name") for e in exts) if p.is_file()]
    if not found:
        raise ValueError(f"{kind} {name!r} not found in {lib}/: create it first (/sdapi/v1/create/{kind})")
    job_id = state.store.new_id()
    run.update(data=str(data), out=str(home.dir(lib)), overwrite=True,
               log_dir=str(log_base / datetime.date.today().isoformat() / f"{name}-{job_id}"))
    run[kind] = str(found[0])
    from ..training.templates import TEMPLATES
    if run["template"] not in TEMPLATES:
        run["template"] = str(home.inside("templates", f"{run['template']}.txt", "template_filename", must_exist="file"))
    settled = J.run_settings(home, kind, run, job_id)      # the same checks as a native job's settings
    return job_id, settled, ignored


async def wait_for_end(state, job_id: str) -> dict:
    """The job's record once it has ended (or, when the server stops, once the worker has saved it)."""
    waiter = state.hub.waiter(job_id)
    try:
        deadline = None
        while True:
            job = state.store.get(job_id)
            if job is None or job["status"] in TERMINAL:
                return job
            if state.hub.closed:
                deadline = deadline or asyncio.get_running_loop().time() + state.settings.shutdown_s
                if asyncio.get_running_loop().time() > deadline:
                    return job
            await waiter.wait(1.0 if state.hub.closed else 10.0)
    finally:
        waiter.close()
