"""`ti-fast serve`'s gate: token, loopback Host, Origin, no CORS, limits, non-images, traversal.

The token on every route (Bearer, Basic, login cookie; never in a URL), the loopback Host rule
without a token (DNS rebinding), cross-site Origins, no CORS, size and count limits (413),
uploads that are not images (400 naming the file), and traversal by every road (`../`, absolute
paths, symlinks, `%2e%2e`, zip entries) refused with nothing written outside the home folder."""
from __future__ import annotations

import http.client
import io
import json
import os
import stat
import zipfile

import pytest
from serve_helpers import LiveServer, demo_files, job_config, require_serve, upload

TOKEN = "s3cret-token-for-tests"


@pytest.fixture(scope="module")
def guarded(tiny_single, tmp_path_factory):
    require_serve()
    srv = LiveServer(tmp_path_factory.mktemp("guarded") / "home", tiny_single, token=TOKEN)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def open_srv(tiny_single, tmp_path_factory):
    """No token, small limits; its home is a sub-folder so that the folder around it can be watched."""
    require_serve()
    outer = tmp_path_factory.mktemp("open")
    srv = LiveServer(outer / "home", tiny_single, max_upload_mb=1, max_file_mb=1, max_body_mb=1, max_files=20,
                     max_pixels=150 * 150)
    srv.outer = outer
    with srv.client() as c:
        assert upload(c, "rings").status_code == 201
    yield srv
    srv.stop()


def raw(srv, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    """A request with the path sent byte for byte (httpx would normalise '..')."""
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        return r.status, dict(r.getheaders()), r.read()
    finally:
        conn.close()


def one_line_error(r) -> str:
    body = r.json()
    assert set(body) >= {"error", "detail"} and "\n" not in body["error"], body
    return body["error"]


# ---------------------------------------------------------------------------- the token

def test_every_route_needs_the_token(guarded):
    with guarded.client() as c:
        for path in ("/api/v1/server", "/api/v1/jobs", "/api/v1/jobs/abc/events", "/api/v1/jobs/abc/files/out/x.pt",
                     "/api/v1/embeddings/x.pt", "/sdapi/v1/samplers", "/sdapi/v1/progress", "/docs",
                     "/openapi.json", "/static/docs.js", f"/api/v1/server?token={TOKEN}"):
            r = c.get(path)
            assert r.status_code == 401, (path, r.status_code)
            assert "token" in one_line_error(r) and "www-authenticate" in r.headers
        assert c.post("/api/v1/jobs", json={"config": {}}).status_code == 401
        assert c.get("/api/v1/server", headers={"Authorization": "Bearer wrong-token-xx"}).status_code == 401


def test_bearer_basic_and_cookie_each_work(guarded):
    with guarded.client(headers={"Authorization": f"Bearer {TOKEN}"}) as c:
        assert c.get("/api/v1/server").json()["token_required"] is True
        assert c.get("/api/v1/jobs/abc/events").status_code == 404          # past the gate: no such job
        assert c.get("/docs").status_code == 200 and c.get("/openapi.json").status_code == 200
    with guarded.client(auth=("any-user", TOKEN)) as c:                     # A1111 --api-auth clients
        assert c.get("/sdapi/v1/samplers").status_code == 200
    with guarded.client() as c:
        assert c.post("/api/v1/login", json={"token": "wrong-token-xx"}).status_code == 401
        r = c.post("/api/v1/login", json={"token": TOKEN})
        assert r.status_code == 200
        cookie = r.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie and TOKEN.lower() not in cookie
        assert c.get("/api/v1/server").status_code == 200                   # the cookie alone
        c.post("/api/v1/logout")
        c.cookies.clear()
        assert c.get("/api/v1/server").status_code == 401


def test_with_a_token_any_host_but_no_foreign_origin(guarded):
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with guarded.client(headers=auth) as c:
        assert c.get("/api/v1/server", headers={"Host": "gpu-box.lan:7861"}).status_code == 200
        r = c.get("/api/v1/server", headers={"Origin": "http://evil.example"})
        assert r.status_code == 403 and "cross-site" in one_line_error(r)


# ---------------------------------------------------------------------------- no token: loopback only

def test_without_a_token_a_foreign_host_or_origin_is_403(open_srv):
    with open_srv.client() as c:
        r = c.get("/api/v1/server", headers={"Host": "evil.example"})
        assert r.status_code == 403 and "loopback" in one_line_error(r)
        for host in (f"127.0.0.1:{open_srv.port}", f"localhost:{open_srv.port}", f"[::1]:{open_srv.port}"):
            assert c.get("/api/v1/server", headers={"Host": host}).status_code == 200, host
        assert c.get("/api/v1/server", headers={"Origin": "http://evil.example"}).status_code == 403
        assert c.get("/api/v1/server", headers={"Origin": "null"}).status_code == 403
        assert c.get("/api/v1/server", headers={"Origin": open_srv.url}).status_code == 200


def test_no_cors_headers_and_hardening_headers(open_srv):
    with open_srv.client() as c:
        r = c.options("/api/v1/jobs", headers={"Origin": open_srv.url, "Access-Control-Request-Method": "POST"})
        assert not [h for h in r.headers if h.lower().startswith("access-control-")]
        r = c.get("/api/v1/server", headers={"Origin": open_srv.url})
        assert not [h for h in r.headers if h.lower().startswith("access-control-")]
        assert r.headers["x-content-type-options"] == "nosniff" and "default-src 'self'" in r.headers["content-security-policy"]
        docs = c.get("/docs").text
        assert "http://" not in docs.replace(open_srv.url, "") and "https://" not in docs     # no CDN
        assert c.get("/static/docs.js").status_code == 200


# ---------------------------------------------------------------------------- limits and bad uploads

def test_oversize_bodies_are_413(open_srv):
    big = b"\x89PNG" + os.urandom(int(1.5 * 2**20))
    with open_srv.client() as c:
        r = upload(c, "big", [("big.png", big, "image/png")])
        assert r.status_code == 413, r.text
        r = c.post("/api/v1/txt2img", content=json.dumps({"prompt": "x" * (2 << 20)}),
                   headers={"Content-Type": "application/json"})
        assert r.status_code == 413

        def chunks():                       # no Content-Length: counted as it arrives
            for _ in range(40):
                yield b"x" * 65536
        r = c.post("/api/v1/txt2img", content=chunks(), headers={"Content-Type": "application/json"})
        assert r.status_code == 413
        many = [(f"c{i}.txt", b"a caption", "text/plain") for i in range(21)]
        assert upload(c, "many", many).status_code == 413
    assert not (open_srv.home / "datasets" / "big").exists()


def test_uploads_that_are_not_images_are_400_naming_the_file(open_srv):
    with open_srv.client() as c:
        imgs = demo_files(1, captions=False)
        r = upload(c, "bad", imgs + [("notes.png", b"this is not a picture", "image/png")])
        assert r.status_code == 400 and "notes.png" in one_line_error(r)
        r = upload(c, "bad", imgs + [("paper.pdf", b"%PDF-1.4", "application/pdf")])
        assert r.status_code == 400 and "paper.pdf" in one_line_error(r)
        r = upload(c, "bad", imgs + [("cap.txt", b"\xff\xfe\x00bad", "text/plain")])
        assert r.status_code == 400 and "cap.txt" in one_line_error(r)
        r = upload(c, "bad", demo_files(1, size=200, captions=False))       # over the pixel bound (150 x 150)
        assert r.status_code == 400 and "img 0.png" in one_line_error(r)
        r = c.post("/api/v1/datasets/bad", content=b"plain", headers={"Content-Type": "text/plain"})
        assert r.status_code == 400
    assert not (open_srv.home / "datasets" / "bad").exists()


# ---------------------------------------------------------------------------- traversal

def _zip(entries) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data, mode in entries:
            info = zipfile.ZipInfo(name)
            if mode is not None:
                info.external_attr = mode << 16
            z.writestr(info, data)
    return buf.getvalue()


def test_traversal_is_refused_and_nothing_lands_outside_home(open_srv):
    home, outer = open_srv.home, open_srv.outer
    before = sorted(p.name for p in outer.iterdir())
    png = demo_files(1, captions=False)[0][1]
    secret = outer / "secret.txt"
    secret.write_text("outside")
    os.symlink(secret, home / "embeddings" / "link.pt")
    os.symlink(outer, home / "datasets" / "escape")
    with open_srv.client() as c:
        job = c.post("/api/v1/jobs", json={"config": job_config("trav", "rings", steps=1)}).json()
        jid = job["id"]
        for path in (f"/api/v1/jobs/{jid}/files/../../jobs.sqlite", f"/api/v1/jobs/{jid}/files/%2e%2e/%2e%2e/jobs.sqlite",
                     f"/api/v1/jobs/{jid}/files/..%2f..%2fjobs.sqlite", "/api/v1/embeddings/..%2fjobs.sqlite",
                     "/api/v1/embeddings/%2e%2e", "/api/v1/embeddings/link.pt", f"/api/v1/jobs/{jid}/files//etc/passwd",
                     "/api/v1/datasets/escape", "/api/v1/outputs/..%5c..%5cjobs.sqlite"):
            status, _, body = raw(open_srv, "GET", path)
            assert 400 <= status < 500, (path, status)
            assert b"outside" not in body and b"SQLite" not in body
        for name in ("..%2fevil", "%2e%2e", "..", "ev%2fil", ".hidden"):
            status, _, _ = raw(open_srv, "POST", f"/api/v1/datasets/{name}", b"x",
                               {"Content-Type": "multipart/form-data; boundary=x"})
            assert 400 <= status < 500, (name, status)
        for data in ("../../etc", "/etc", str(outer), "escape", "rings/../../..", "%2e%2e/x", "rings\\..\\x"):
            r = c.post("/api/v1/jobs", json={"config": job_config("trav2", data)})
            assert 400 <= r.status_code < 500, (data, r.text)
        for key, value in (("log_dir", "../../evil"), ("out", "/tmp/evil"), ("embedding", "link.pt"),
                           ("template", "../../secret.txt"), ("cache_dir", "../../evil")):
            r = c.post("/api/v1/jobs", json={"config": job_config("trav3", "rings", **{key: value})})
            assert 400 <= r.status_code < 500, (key, r.text)
        ok = c.post("/api/v1/jobs", json={"config": job_config("trav4", str(home / "datasets" / "rings"), steps=1)})
        assert ok.status_code == 201, ok.text                     # an absolute path inside HOME is fine
        for fname in ("../evil.png", "/abs/evil.png", "sub/evil.png", "..\\evil.png", ".evil.png"):
            r = upload(c, "up", [(fname, png, "image/png")])
            assert 400 <= r.status_code < 500, (fname, r.text)
        zips = {"dotdot.zip": [("../evil.png", png, None)], "abs.zip": [("/tmp/evil.png", png, None)],
                "deep.zip": [("a/../../evil.png", png, None)], "win.zip": [("C:/evil.png", png, None)],
                "link.zip": [("evil.png", b"/etc/passwd", stat.S_IFLNK | 0o777)],
                "fifo.zip": [("evil.png", b"", stat.S_IFIFO | 0o644)]}
        for zname, entries in zips.items():
            r = upload(c, "zipped", [(zname, _zip(entries), "application/zip")])
            assert r.status_code == 400, (zname, r.text)
        bomb = io.BytesIO()
        with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as z:
            z.writestr("zero.png", b"\0" * (3 << 20))                 # 3 MiB of zeros, a few KB packed
        assert upload(c, "zipped", [("bomb.zip", bomb.getvalue(), "application/zip")]).status_code == 413
        good = _zip([("cats/a.png", png, None), ("cats/a.txt", b"a ring", None), ("__MACOSX/._a.png", b"x", None),
                     ("readme.md", b"hi", None)])
        r = upload(c, "zipped", [("good.zip", good, "application/zip")])
        assert r.status_code == 201 and r.json()["images"] == 1 and r.json()["skipped"] == ["readme.md"]
        c.post(f"/api/v1/jobs/{jid}/cancel")
    assert secret.read_text() == "outside"
    assert sorted(p.name for p in outer.iterdir()) == sorted(before + ["secret.txt"])
    assert not list(outer.rglob("evil*"))
    assert sorted(p.name for p in (home / "datasets").iterdir()) == ["escape", "rings", "zipped"]
    assert not list((home / "tmp").iterdir())                          # staging cleaned up


def test_errors_are_json_of_one_line(open_srv):
    with open_srv.client() as c:
        r = c.get("/api/v1/no-such-route")
        assert r.status_code == 404 and one_line_error(r)
        r = c.post("/api/v1/jobs", json={"kind": "embedding"})
        assert r.status_code == 422 and "config" in one_line_error(r)
        r = c.post("/api/v1/jobs", content=b"{not json", headers={"Content-Type": "application/json"})
        assert r.status_code == 422 and one_line_error(r)
        r = c.get("/api/v1/jobs/nope")
        assert r.status_code == 404 and "nope" in one_line_error(r)
