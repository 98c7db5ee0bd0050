"""Native API, the library half (/api/v1): server, login, datasets, embeddings, hypernetworks, txt2img.

Server info and login, datasets (upload, list, delete), embeddings and hypernetworks (list with
what `inspect` says, create, download, delete), txt2img and its outputs, and the options a
training form offers."""
from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse
from pydantic import BaseModel, Field

from .. import __version__
from . import uploads as U
from .errors import Conflict, HTTPRefusal, NotFound
from .jobs import LIBRARY
from .security import COOKIE, session_value
from .settings import PROCESS_KEYS
from .store import ACTIVE

EMBEDDING_EXTS = (".pt", ".safetensors", ".bin", ".png", ".webp")


class Login(BaseModel):
    token: str = Field(description="the server's --token")


class NewEmbedding(BaseModel):
    name: str = Field(description="trigger word and file stem (letters, digits, '._- ')")
    init_text: str = Field("*", description="initial vectors from these tokens")
    vectors: int = Field(1, description="vectors per token")
    overwrite: bool = False


class NewHypernetwork(BaseModel):
    name: str
    sizes: list[int] | None = Field(None, description="widths (default: the model's own, 768,320,640,1280 on SD1)")
    layer_structure: str = "1,2,1"
    activation: str = "linear"
    init: str = "normal"
    layer_norm: bool = False
    dropout_structure: str | None = None
    use_dropout: bool = False
    last_layer_dropout: bool = False
    activate_output: bool = False
    seed: int | None = None
    overwrite: bool = False


class Txt2Img(BaseModel):
    prompt: str
    negative_prompt: str = ""
    seed: int | None = Field(None, description="None: drawn; images use seed, seed+1, ...")
    steps: int = 20
    sampler: str = Field("euler_a", description="euler_a, euler, ddim, dpmpp_2m (or A1111's labels)")
    karras: bool | None = None
    cfg: float = 7.0
    width: int = 512
    height: int = 512
    batch: int = 1
    clip_skip: int = 1


def generate_call(state, gen: dict, out: Path):
    """A function for the worker: txt2img on the loaded model, embeddings and hypernetworks from HOME."""
    def run(model):
        from ..sample.generate import GenerateConfig, generate
        device = next(model.unet.parameters()).device
        cfg = GenerateConfig(model=str(model.info.path), embeddings=[str(state.home.dir("embeddings"))],
                             hypernetworks=[str(state.home.dir("hypernetworks"))], out=str(out), device=str(device),
                             quiet=True, **gen)
        return generate(cfg, model=model)
    return run


def option_choices() -> dict[str, list[str]]:
    """The training keys whose values are one of a fixed set (a form offers them as a list; the
    trainer's preflight still checks every value)."""
    from ..diffusion.samplers import SAMPLERS
    from ..hypernetworks.names import ACTIVATION_NAMES, INITS
    from ..training.config import LATENT_MODES, OPTIMIZERS, RESIZE_MODES
    return {"latents": list(LATENT_MODES), "resize": list(RESIZE_MODES), "optimizer": list(OPTIMIZERS),
            "preview_sampler": list(SAMPLERS), "activation": list(ACTIVATION_NAMES), "init": list(INITS)}


def describe_file(path: Path, url: str) -> dict:
    from ..errors import UserError
    from ..interop.describe import describe
    try:
        d = describe(path)
    except UserError as e:
        return {"file": path.name, "error": str(e), "url": url}
    d.pop("norms", None)
    d["path"] = path.name
    return {"file": path.name, **d, "url": url}


def router(state) -> APIRouter:
    r = APIRouter(prefix="/api/v1")
    home, settings = state.home, state.settings
    limits = U.Limits(max_upload=settings.max_upload_mb << 20, max_file=settings.max_file_mb << 20,
                      max_files=settings.max_files, max_pixels=settings.max_pixels)

    # ------------------------------------------------------------------ server
    @r.post("/login", summary="Check the token and set the HttpOnly session cookie")
    async def login(body: Login):
        import asyncio
        import hmac
        if settings.token is None:
            return {"ok": True, "token_required": False}
        if not hmac.compare_digest(body.token.encode(), settings.token.encode()):
            await asyncio.sleep(0.5)                     # slows guessing; the token should be long anyway
            return JSONResponse({"error": "wrong token", "detail": "wrong token"}, status_code=401)
        resp = JSONResponse({"ok": True, "token_required": True})
        resp.set_cookie(COOKIE, session_value(settings.token), httponly=True, samesite="strict", path="/")
        return resp

    @r.post("/logout", summary="Forget the session cookie")
    def logout():
        resp = JSONResponse({"ok": True})
        resp.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict")
        return resp

    @r.get("/server", summary="The model, the worker and the limits")
    def server():
        info = state.model_info
        return {"version": __version__, "model": {"name": info.name, "hash": info.hash} if info else None,
                "worker": state.worker.status(), "max_running": settings.max_running,
                "token_required": settings.token is not None,
                "limits": {"upload_mb": settings.max_upload_mb, "file_mb": settings.max_file_mb,
                           "files": settings.max_files, "body_mb": settings.max_body_mb}}

    @r.get("/train-options", summary="Every training key of a kind (embedding | hypernetwork) with its default, "
                                      "the choices of those that have a fixed set (process-wide ones marked)")
    def train_options(kind: str = "embedding"):
        from ..training.config import config_class
        if kind not in LIBRARY:
            raise HTTPRefusal(f"kind {kind!r}: choose embedding or hypernetwork")
        choices = option_choices()
        out = []
        for f in dataclasses.fields(config_class(kind)):
            default = f.default if f.default is not dataclasses.MISSING else None
            out.append({"key": f.name, "type": str(f.type), "default": default,
                        "process_wide": f.name in PROCESS_KEYS or f.name in ("resume", "quiet"),
                        **({"choices": choices[f.name]} if f.name in choices else {})})
        return out

    @r.get("/samplers", summary="Samplers for txt2img and previews: key, A1111's label, default schedule")
    def samplers():
        from ..diffusion.samplers import SAMPLERS
        return [{"key": k, "label": i.label, "default_schedule": i.default_schedule} for k, i in SAMPLERS.items()]

    @r.get("/templates", summary="Built-in prompt templates and the files in HOME/templates")
    def templates():
        from ..training.templates import TEMPLATES
        return {"builtin": list(TEMPLATES), "files": [p.name for p in home.files("templates", (".txt",))]}

    # ------------------------------------------------------------------ datasets
    @r.get("/datasets", summary="Uploaded datasets")
    def datasets():
        return [U.describe_dataset(p) for p in sorted(home.dir("datasets").iterdir())
                if p.is_dir() and not p.is_symlink()]

    @r.post("/datasets/{name}", status_code=201,
            summary="Upload images and .txt captions (multipart, field 'files'), or one .zip of them")
    async def upload(name: str, request: Request, replace: bool = False):
        target = home.child("datasets", name, "dataset")
        staging = home.tmpdir("upload-")
        try:
            inbox = staging / "in"
            inbox.mkdir()
            got = await U.receive(request, inbox, limits)
            zips = [n for n in got.files if U.kind_of_name(n) == "zip"]
            if zips:
                if len(got.files) > 1:
                    raise HTTPRefusal("upload: send one .zip alone, or images and captions without a zip")
                client, zpath = got.files[zips[0]]
                data = staging / "data"
                data.mkdir()
                rels, skipped = await run_in_threadpool(U.extract_zip, zpath, client, data, limits)
                names = {rel: f"{client}: {rel}" for rel in rels}
            else:
                data, skipped = inbox, []
                names = {n: client for n, (client, _) in got.files.items()}
            counts = await run_in_threadpool(U.check_files, data, names, limits)
            await run_in_threadpool(U.install, data, target, replace)
            return {**U.describe_dataset(target), "added": counts, "skipped": skipped}
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    @r.get("/datasets/{name}", summary="The files of a dataset")
    def dataset(name: str):
        folder = home.child("datasets", name, "dataset", must_exist="folder")
        files = [{"name": p.relative_to(folder).as_posix(), "size": p.stat().st_size}
                 for p in sorted(folder.rglob("*")) if p.is_file() and not p.is_symlink()]
        return {**U.describe_dataset(folder), "files": files}

    @r.delete("/datasets/{name}", summary="Delete a dataset (not while a job uses it)")
    def delete_dataset(name: str):
        folder = home.child("datasets", name, "dataset", must_exist="folder")
        for job in state.store.list(status=ACTIVE):
            if Path(job["config"].get("data", "")) == folder:
                raise Conflict(f"dataset {name!r}: job {job['id']} ({job['status']}) trains on it")
        shutil.rmtree(folder)
        return {"deleted": name}

    # ------------------------------------------------------------------ libraries
    def listing(sub: str, exts) -> list[dict]:
        return [describe_file(p, f"/api/v1/{sub}/{p.name}") for p in home.files(sub, exts)]

    @r.get("/embeddings", summary="The embedding library, as `ti-fast inspect` describes each file")
    def embeddings():
        return [d for d in listing("embeddings", EMBEDDING_EXTS)
                if not (d.get("error") and Path(d["file"]).suffix in (".png", ".webp"))]

    @r.post("/embeddings", status_code=201, summary="Create an embedding from init text (A1111's create embedding)")
    def create_embedding(body: NewEmbedding):
        from ..embeddings import create_embedding_file
        path = home.child("embeddings", f"{body.name}.pt", "name")
        if path.exists() and not body.overwrite:
            raise Conflict(f"embedding {path.name} exists: send overwrite=true to replace it")
        create_embedding_file(body.name, settings.model, home.dir("embeddings"), init_text=body.init_text,
                              vectors=body.vectors, tokenizer=settings.process.get("tokenizer"), overwrite=body.overwrite)
        return describe_file(path, f"/api/v1/embeddings/{path.name}")

    @r.get("/hypernetworks", summary="The hypernetwork library")
    def hypernetworks():
        return listing("hypernetworks", (".pt",))

    @r.post("/hypernetworks", status_code=201, summary="Create a hypernetwork (A1111's create hypernetwork)")
    def create_hypernetwork(body: NewHypernetwork):
        path = home.child("hypernetworks", f"{body.name}.pt", "name")
        new_hypernetwork_file(state, path, body.model_dump())
        return describe_file(path, f"/api/v1/hypernetworks/{path.name}")

    for sub in ("embeddings", "hypernetworks", "outputs"):
        _file_routes(r, state, sub)

    # ------------------------------------------------------------------ txt2img
    @r.post("/txt2img", summary="Generate between training steps; PNGs with infotext in HOME/outputs")
    async def txt2img(body: Txt2Img):
        import asyncio
        res = await asyncio.wrap_future(state.worker.call(generate_call(state, body.model_dump(), home.dir("outputs"))))
        return {"images": [{"file": p.name, "url": f"/api/v1/outputs/{p.name}", "seed": s, "infotext": t}
                           for p, s, t in zip(res.paths, res.seeds, res.infotexts)]}

    @r.get("/outputs", summary="Generated images, newest first")
    def outputs(limit: int = 100):
        files = sorted(home.files("outputs", (".png",)), key=lambda p: p.stat().st_mtime, reverse=True)[:max(0, limit)]
        return [{"file": p.name, "url": f"/api/v1/outputs/{p.name}"} for p in files]

    return r


def _file_routes(r: APIRouter, state, sub: str) -> None:
    """GET and DELETE of one file in a HOME folder (a plain name: no paths, no links)."""
    home = state.home

    @r.get(f"/{sub}/{{file}}", summary=f"Download a file of {sub}", name=f"get_{sub}")
    def get_file(file: str):
        path = home.child(sub, file, "file", must_exist="file")
        return FileResponse(path, filename=path.name, content_disposition_type=_disposition(path))

    @r.delete(f"/{sub}/{{file}}", summary=f"Delete a file of {sub}", name=f"delete_{sub}")
    def delete_file(file: str):
        path = home.child(sub, file, "file", must_exist="file")
        for job in state.store.list(status=ACTIVE):
            if str(path) in (job["config"].get("embedding"), job["config"].get("hypernetwork")) or \
                    (path.parent == Path(job["out_dir"]) and path.stem == job["name"]):
                raise Conflict(f"{file}: job {job['id']} ({job['status']}) uses it")
        path.unlink()
        return {"deleted": file}


def _disposition(path: Path) -> str:
    return "inline" if path.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp") else "attachment"


def new_hypernetwork_file(state, path: Path, o: dict) -> Path:
    """Write HOME/hypernetworks/NAME.pt from create options (the create-hypernetwork flags)."""
    from ..hypernetworks import check_widths, model_widths, new_hypernetwork, structure_from_options
    from ..hypernetworks import HypernetworkError
    if path.exists() and not o.get("overwrite"):
        raise Conflict(f"hypernetwork {path.name} exists: send overwrite=true to replace it")
    if o.get("dropout_structure") and (o.get("use_dropout") or o.get("last_layer_dropout")):
        raise HypernetworkError("dropout_structure and use_dropout/last_layer_dropout exclude each other")
    sizes = o.get("sizes")
    structure = structure_from_options(o.get("layer_structure") or "1,2,1", o.get("activation") or "linear",
                                       o.get("init") or "normal", bool(o.get("layer_norm")), o.get("dropout_structure"),
                                       bool(o.get("use_dropout")), bool(o.get("last_layer_dropout")),
                                       bool(o.get("activate_output")), sizes=[int(s) for s in sizes or ()])
    widths = model_widths(state.settings.model)
    sizes = check_widths(sizes, widths, "sizes") if sizes else widths
    hn = new_hypernetwork(path.stem, sizes, structure, seed=o.get("seed"))
    hn.save(path)
    return path


__all__ = ["router", "generate_call", "describe_file", "new_hypernetwork_file", "NotFound"]
