"""Check the web page in Firefox: headless Firefox over WebDriver BiDi (no geckodriver) on the tiny model.

tests/test_web.py drives Chromium in CI; this is the same page's check in Firefox, run by hand
where Firefox is installed (`apt-get install firefox-esr`): `python scripts/web_firefox_check.py
[--firefox firefox-esr] [--shots DIR]`. It starts `ti-fast serve` with a token on a free loopback
port with a tiny random model, trains one run to its end and starts a second, then in Firefox:
the token form, the loss chart and previews fed by the event stream, a dropped file refused
naming it, a setting refused beside its field, an image generated with its infotext, Stop, and
a phone-sized viewport without sideways scrolling. One line per check; exit 1 at the first
failure. Needs the [web-test] extra (httpx, and websocket-client with selenium)."""
from __future__ import annotations

import argparse
import base64
import io
import itertools
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TOKEN = "firefox-check-token"


class Bidi:
    """The few WebDriver BiDi commands the check needs, over Firefox's own remote agent."""

    def __init__(self, url: str):
        import websocket
        self.ws = websocket.create_connection(url, timeout=60, suppress_origin=True)
        self.ids = itertools.count(1)
        self.ctx = None

    def cmd(self, method: str, **params):
        i = next(self.ids)
        self.ws.send(json.dumps({"id": i, "method": method, "params": params}))
        while True:
            m = json.loads(self.ws.recv())
            if m.get("id") == i:
                if m.get("type") == "error":
                    raise RuntimeError(f"{method}: {m.get('error')}: {m.get('message')}")
                return m["result"]

    def js(self, expression: str):
        r = self.cmd("script.evaluate", expression=expression, target={"context": self.ctx}, awaitPromise=True)
        if r.get("type") == "exception":
            raise RuntimeError(f"{expression[:60]}...: {r['exceptionDetails'].get('text')}")
        return r["result"].get("value")

    def wait(self, expression: str, what: str, timeout: float = 30):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.js(expression)
            if value:
                return value
            time.sleep(0.1)
        raise AssertionError(f"waited {timeout} s for {what}")

    def shot(self, path: Path) -> None:
        path.write_bytes(base64.b64decode(self.cmd("browsingContext.captureScreenshot", context=self.ctx)["data"]))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(home: Path, model: Path) -> tuple[subprocess.Popen, str]:
    (home.parent / "token.txt").write_text(TOKEN)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "ti_fast.cli", "serve", "--model", str(model), "--home", str(home),
                             "--port", "0", "--device", "cpu", "--token-file", str(home.parent / "token.txt")],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    for line in proc.stderr:
        if "listening on http://127.0.0.1:" in line:
            return proc, "http://127.0.0.1:" + line.split("127.0.0.1:")[1].split("/")[0]
    raise SystemExit("ti-fast serve did not start")


def setup(url: str) -> str:
    """A dataset, one finished run and one running; returns the running job's id."""
    import httpx
    from PIL import Image
    files = []
    for i in range(3):
        buf = io.BytesIO()
        Image.new("RGB", (64, 64), (60 * i, 120, 200 - 40 * i)).save(buf, "PNG")
        files += [("files", (f"img{i}.png", buf.getvalue(), "image/png")), ("files", (f"img{i}.txt", b"a ring", "text/plain"))]
    base = dict(data="rings", width=64, height=64, lr="0.01", init_text="ring", template="subject", preview_every=3,
                preview_steps=2, save_every=0, seed=1)
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=120) as c:
        c.post("/api/v1/datasets/rings", files=files).raise_for_status()
        done = c.post("/api/v1/jobs", json={"config": {**base, "name": "ffdone", "steps": 12}}).json()
        while c.get(f"/api/v1/jobs/{done['id']}").json()["status"] != "completed":
            time.sleep(0.2)
        return c.post("/api/v1/jobs", json={"config": {**base, "name": "ffrun", "steps": 100000}}).json()["id"]


def check(b: Bidi, url: str, shots: Path) -> None:
    def ok(msg):
        print(f"ok: {msg}")

    b.cmd("browsingContext.navigate", context=b.ctx, url=url + "/", wait="complete")
    b.wait("!document.querySelector('#login').hidden", "the token form")
    ok("the page loads without the token and asks for it")
    b.js(f"document.querySelector('#login-token').value = '{TOKEN}'; document.querySelector('#login-btn').click(); 1")
    b.wait("document.body.dataset.ready === '1'", "the page after the token")
    ok("after the token: " + b.js("document.querySelector('#server-model').textContent"))
    b.wait("document.querySelectorAll('#jobs .job').length === 2", "two job cards")
    b.js("Array.from(document.querySelectorAll('#jobs .job')).find(j => j.dataset.status === 'running')"
         ".querySelector('.job-watch').click(); 1")
    first = int(b.wait("document.querySelector('#loss-chart').dataset.points", "loss points"))
    b.wait(f"Number(document.querySelector('#loss-chart').dataset.points) > {first + 5}", "the chart to grow")
    b.wait("Array.from(document.querySelectorAll('#previews img')).filter(i => i.naturalWidth === 64).length >= 2",
           "two previews")
    ok("stream: " + b.js("['#st-status', '#st-step', '#st-speed', '#st-eta'].map(s => "
                         "document.querySelector(s).textContent).join(' | ')"))
    b.js("""(() => { const dt = new DataTransfer(); dt.items.add(new File(['x'], 'bad.png', {type: 'image/png'}));
            document.querySelector('#dropzone').dispatchEvent(new DragEvent('drop', {dataTransfer: dt, bubbles: true}));
            const n = document.querySelector('#upload-name'); n.value = 'bad'; n.dispatchEvent(new Event('input'));
            return 1; })()""")
    b.wait("!document.querySelector('#upload-btn').disabled", "the dropped file picked")
    b.js("document.querySelector('#upload-btn').click(); 1")
    ok("drop: " + b.wait("document.querySelector('#upload-err').textContent", "the refusal of bad.png"))
    fill = "(() => { const f = (id, v) => { const e = document.querySelector(id); e.value = v; " \
           "e.dispatchEvent(new Event('input')); }; %s; document.querySelector('%s').click(); return 1; })()"
    b.js(fill % ("f('#f-name', 'ffnew'); f('#f-width', '63')", "#start-btn"))
    ok("beside width: " + b.wait("document.querySelector('.err[data-for=width]').textContent", "the width refusal"))
    b.js(fill % ("f('#g-prompt', 'ffdone'); f('#g-steps', '2'); f('#g-width', '64'); f('#g-height', '64'); "
                 "f('#g-seed', '3')", "#gen-btn"))
    info = b.wait("(() => { const i = document.querySelector('#gen-results img'); return i && i.naturalWidth === 64 "
                  "&& document.querySelector('#gen-results .infotext').textContent; })()", "the generated image")
    ok("generated: " + info.splitlines()[1][:60])
    b.js("document.querySelector('#watch-stop').click(); 1")
    b.wait("document.querySelector('#st-status').textContent === 'stopped'", "the job stopped")
    ok("stopped: " + b.js("Array.from(document.querySelectorAll('.job-status')).map(s => s.textContent).join(', ')"))
    b.js("window.scrollTo(0, 0); 1")
    b.shot(shots / "firefox-laptop.png")
    b.cmd("browsingContext.setViewport", context=b.ctx, viewport={"width": 390, "height": 844})
    b.wait("document.documentElement.scrollWidth <= window.innerWidth", "no sideways scrolling on a phone")
    b.shot(shots / "firefox-phone.png")
    ok(f"phone-sized viewport; screenshots in {shots}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--firefox", default=shutil.which("firefox-esr") or shutil.which("firefox") or "firefox")
    ap.add_argument("--shots", default="firefox-check", help="folder for the screenshots")
    a = ap.parse_args()
    from ti_fast.loading import make_tiny
    shots = Path(a.shots)
    shots.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        proc, url = serve(tmp / "home", make_tiny(tmp / "model", "single", seed=0))
        port = free_port()
        (tmp / "profile").mkdir()
        ff = subprocess.Popen([a.firefox, "--headless", "--no-remote", "--profile", str(tmp / "profile"),
                               "--window-size=1280,900",
                               "--remote-debugging-port", str(port)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
        try:
            setup(url)
            ws = next(line.split("listening on ")[1].strip() for line in ff.stderr if "WebDriver BiDi listening on" in line)
            b = Bidi(ws + "/session")
            b.cmd("session.new", capabilities={})
            b.ctx = b.cmd("browsingContext.getTree")["contexts"][0]["context"]
            check(b, url, shots)
            b.cmd("session.end")
            return 0
        except (AssertionError, RuntimeError) as e:
            print(f"FAILED: {e}")
            return 1
        finally:
            ff.terminate()
            proc.terminate()
            ff.wait(30)
            proc.wait(40)


if __name__ == "__main__":
    sys.exit(main())
