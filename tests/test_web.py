"""The web page at / in a real headless Chromium: upload, train, watch, stop, resume, use; the token.

Selenium drives the system Chromium and its driver (Debian's `chromium`, `chromium-driver`; no
browser is downloaded) against `ti-fast serve` itself (a child process) on a free loopback port
with the tiny model on the CPU. Screenshots go to the test's temp folder; with
TI_FAST_WEB_SCREENSHOT=PATH the test also writes the README's screenshot there. The browser's
network log (Chrome's performance log) shows that no request leaves the server's origin. Without
Chromium or selenium the browser tests skip, and under CI=1 they fail instead. The gate's public
paths, the training options and the event stream of a resumed job are checked over plain HTTP."""
from __future__ import annotations

import base64
import importlib.util
import io
import json
import os
import re
import signal
import subprocess
import time
import zipfile
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from ci_helpers import skip_or_fail
from serve_helpers import ChildServer, demo_files, job_config, require_serve, submit, upload, wait_job

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
TOKEN = "web-page-token-0123"
WEB = Path(__file__).resolve().parents[1] / "ti_fast" / "serve" / "static" / "web"


def require_browser() -> None:
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.path.exists(p)]
    if importlib.util.find_spec("selenium") is None:
        missing.append("selenium (pip install -e '.[web-test]')")
    if missing:
        skip_or_fail(f"the browser test needs {', '.join(missing)} (apt-get install -y chromium chromium-driver)")


def stop(srv: ChildServer) -> None:
    srv.proc.send_signal(signal.SIGTERM)
    try:
        srv.proc.wait(40)
    except subprocess.TimeoutExpired:
        srv.proc.kill()
        srv.proc.wait(10)
        pytest.fail("the server did not stop within 40 s of SIGTERM")


@pytest.fixture(scope="module")
def server(tiny_single, tmp_path_factory):
    require_serve()
    srv = ChildServer(tmp_path_factory.mktemp("web-home"), tiny_single)
    yield srv
    stop(srv)


@pytest.fixture(scope="module")
def token_server(tiny_single, tmp_path_factory):
    require_serve()
    folder = tmp_path_factory.mktemp("web-token")
    (folder / "token.txt").write_text(TOKEN + "\n")
    srv = ChildServer(folder / "home", tiny_single, "--token-file", str(folder / "token.txt"))
    yield srv
    stop(srv)


# ---------------------------------------------------------------------------- the browser

class Browser:
    """Headless Chromium at a small fixed window; every URL it requested, from its network log."""

    def __init__(self, tmp: Path, origin: str):
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
        os.environ.setdefault("SE_OFFLINE", "true")          # never let Selenium Manager fetch anything
        opts = webdriver.ChromeOptions()
        opts.binary_location = CHROMIUM
        for arg in ("--headless=new", "--no-sandbox", "--window-size=1280,900", "--force-device-scale-factor=1",
                    "--disable-gpu", "--disable-dev-shm-usage", "--disable-extensions", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-default-apps",
                    "--disable-sync", "--password-store=basic", f"--user-data-dir={tmp / 'profile'}"):
            opts.add_argument(arg)
        opts.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
        opts.add_experimental_option("perfLoggingPrefs", {"enableNetwork": True, "enablePage": False})
        self.driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
        self.driver.set_script_timeout(30)
        self.tmp, self.origin = tmp, origin
        self.urls: list[str] = []
        self.console: list[dict] = []
        self.shots = 0

    def open(self, url: str) -> None:
        """Navigate to url, the log holding only what that page asks for (not Chromium's new-tab page)."""
        self.driver.get("about:blank")
        self.read_logs()
        self.urls.clear()
        self.console.clear()
        self.driver.get(url)

    def read_logs(self) -> None:
        for entry in self.driver.get_log("performance"):
            msg = json.loads(entry["message"])["message"]
            if msg["method"] == "Network.requestWillBeSent":
                self.urls.append(msg["params"]["request"]["url"])
            elif msg["method"] == "Network.webSocketCreated":
                self.urls.append(msg["params"]["url"])
        self.console += self.driver.get_log("browser")

    def foreign_requests(self) -> list[str]:
        self.read_logs()
        mine = urlsplit(self.origin)
        return [u for u in self.urls if not u.startswith(("data:", "blob:"))
                and (urlsplit(u).scheme, urlsplit(u).netloc) != (mine.scheme, mine.netloc)]

    def script_errors(self) -> list[str]:
        """Console errors but the failed requests a test makes on purpose (400, 401, 409)."""
        self.read_logs()
        return [e["message"] for e in self.console if e["level"] == "SEVERE" and "Failed to load resource" not in e["message"]]

    def shot(self, name: str) -> Path:
        self.shots += 1
        path = self.tmp / f"{self.shots:02d}-{name}.png"
        self.driver.save_screenshot(str(path))
        return path

    def wait(self, cond, what: str, timeout: float = 30):
        from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
        from selenium.webdriver.support.ui import WebDriverWait
        try:
            return WebDriverWait(self.driver, timeout, poll_frequency=0.05,
                                 ignored_exceptions=(StaleElementReferenceException,)).until(lambda d: cond())
        except TimeoutException:
            path = self.shot("timeout")
            pytest.fail(f"waited {timeout} s for {what} (screenshot {path})")

    def js(self, script: str, *args):
        return self.driver.execute_script(script, *args)

    def el(self, css: str):
        from selenium.webdriver.common.by import By
        return self.driver.find_element(By.CSS_SELECTOR, css)

    def els(self, css: str):
        from selenium.webdriver.common.by import By
        return self.driver.find_elements(By.CSS_SELECTOR, css)

    def text(self, css: str) -> str:
        found = self.els(css)
        return found[0].text if found else ""

    def click(self, css: str) -> None:
        """Click as a person would: the element scrolled to the middle first (the header is sticky)."""
        e = self.el(css)
        self.js("arguments[0].scrollIntoView({block: 'center', behavior: 'instant'})", e)
        e.click()

    def type(self, css: str, value) -> None:
        e = self.el(css)
        e.clear()
        e.send_keys(str(value))

    def choose(self, css: str, value: str) -> None:
        from selenium.webdriver.support.ui import Select
        Select(self.el(css)).select_by_value(value)

    def tick(self, css: str, on: bool = True) -> None:
        if self.el(css).is_selected() != on:
            self.click(css)

    def open_details(self, css: str) -> None:
        self.js("document.querySelector(arguments[0]).open = true", css)

    def quit(self) -> None:
        self.driver.quit()


@pytest.fixture
def browser_for(tmp_path):
    made = []

    def make(srv) -> Browser:
        require_browser()
        b = Browser(tmp_path, srv.url)
        made.append(b)
        return b
    yield make
    for b in made:
        b.quit()


def ready(b: Browser) -> bool:
    return b.js("return document.body.dataset.ready") == "1"


def card(b: Browser, name: str) -> str:
    """The CSS selector of a job's card by its name (the newest such card)."""
    ids = b.js("""return Array.from(document.querySelectorAll('#jobs .job'))
                   .filter(c => c.querySelector('.job-name').textContent === arguments[0]).map(c => c.dataset.id)""", name)
    return f'#jobs .job[data-id="{ids[0]}"]' if ids else "#jobs .job[data-id='none']"


def status_of(b: Browser, name: str) -> str:
    found = b.els(card(b, name))
    return found[0].get_attribute("data-status") if found else ""


def points(b: Browser) -> int:
    return int(b.el("#loss-chart").get_attribute("data-points") or 0)


def preview_steps(b: Browser) -> list[int]:
    """The steps of the previews shown (newest first), once their images have loaded."""
    return b.js("""return Array.from(document.querySelectorAll('#previews figure'))
                   .filter(f => f.querySelector('img').naturalWidth > 0).map(f => Number(f.dataset.step))""")


def drop_files(b: Browser, files: list[tuple[str, bytes, str]]) -> None:
    """A drop of files on the drop zone, as a file manager makes it (a DataTransfer of Files)."""
    b.js("""const dt = new DataTransfer();
            for (const [name, b64, type] of arguments[0]) {
              const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
              dt.items.add(new File([bytes], name, {type}));
            }
            document.querySelector('#dropzone').dispatchEvent(
              new DragEvent('drop', {dataTransfer: dt, bubbles: true, cancelable: true}));""",
         [[n, base64.b64encode(data).decode(), t] for n, data, t in files])


def fill_job(b: Browser, name: str, **over) -> None:
    """The training form for a tiny run (64 px, previews every 2 steps at 2 sampling steps)."""
    values = {"#f-steps": 100000, "#f-lr": "0.01", "#f-width": 64, "#f-height": 64, "#f-preview_every": 2,
              "#f-preview_steps": 2, "#f-init_text": "ring", "#f-vectors": 2, **over}
    b.type("#f-name", name)
    for css, v in values.items():
        b.type(css, v)
    b.choose("#f-template", "subject")


def generate(b: Browser, steps: int, seed: int | None = None) -> str:
    """The txt2img box at 64 px: the infotext of the image it shows (once the image has loaded)."""
    if seed is not None:
        b.type("#g-seed", seed)
    b.type("#g-steps", steps)
    b.open_details("#gen-form details")
    b.type("#g-width", 64)
    b.type("#g-height", 64)
    b.click("#gen-btn")
    b.wait(lambda: b.js("const i = document.querySelector('#gen-results img'); return i && i.naturalWidth") == 64,
           "the generated image")
    return b.text("#gen-results .infotext")


def test_train_watch_stop_and_use_in_chromium(server, browser_for, tmp_path):
    b = browser_for(server)
    d = b.driver
    b.open(server.url + "/")
    b.wait(lambda: ready(b), "the page to load")
    chart = b.el("#loss-chart")
    assert "chart" in (chart.get_attribute("class") + chart.get_attribute("id")) and chart.is_displayed()
    assert chart.tag_name == "canvas" and points(b) == 0 and chart.size["height"] > 100
    empty_chart = b.js("return arguments[0].toDataURL()", chart)
    with server.client() as c:
        model = c.get("/api/v1/server").json()["model"]
    assert b.text("#server-model").startswith(f"{model['name']} [{model['hash']}]")
    # the defaults come from the server: the CLI's (TrainConfig's)
    assert b.el("#f-steps").get_attribute("value") == "3000" and b.el("#f-lr").get_attribute("value") == "0.005"
    b.shot("empty")

    # upload: a file that is not an image is refused naming it; images with captions dropped; a zip chosen
    drop_files(b, [("broken.png", b"not a png at all", "image/png")])
    b.type("#upload-name", "broken")
    b.click("#upload-btn")
    b.wait(lambda: "broken.png" in b.text("#upload-err"), "the refusal of broken.png")
    drop_files(b, demo_files(3))
    assert "3 images, 3 captions" in b.text("#upload-picked")
    b.type("#upload-name", "rings")
    b.click("#upload-btn")
    b.wait(lambda: "3 images, 3 captions" in b.text("#upload-status"), "the dropped upload")
    zpath = tmp_path / "ringzip.zip"
    with zipfile.ZipFile(zpath, "w") as z:
        for n, data, _ in demo_files(2):
            z.writestr(f"set/{n}", data)
    b.el("#upload-files").send_keys(str(zpath))
    b.wait(lambda: b.el("#upload-name").get_attribute("value") == "ringzip", "the name taken from the zip")
    b.click("#upload-btn")
    b.wait(lambda: "ringzip: 2 images" in b.text("#upload-status"), "the zip upload")
    b.choose("#dataset", "rings")

    # the server's own one-line errors, beside the field they name
    fill_job(b, "webcat", **{"#f-width": 63})
    b.click("#start-btn")
    b.wait(lambda: "multiples of 8" in b.text('.err[data-for="width"]'), "the width refusal beside its field")
    with server.client() as c:
        r = c.post("/api/v1/jobs", json={"config": job_config("webcat", "rings", width=63)})
    assert b.text('.err[data-for="width"]') == r.json()["error"]
    b.type("#f-width", 64)
    b.type("#f-lr", "x")
    b.click("#start-btn")
    b.wait(lambda: "not a number" in b.text('.err[data-for="lr"]'), "the lr refusal beside its field")
    assert b.text('.err[data-for="width"]') == ""
    b.type("#f-lr", "0.01")

    # train and watch: the chart fills, speed and ETA show, previews appear as they are written
    b.click("#start-btn")
    b.wait(lambda: status_of(b, "webcat") == "running", "webcat running")
    b.wait(lambda: points(b) >= 4, "loss points on the chart")
    first = b.js("return arguments[0].toDataURL()", chart)
    assert first != empty_chart
    b.wait(lambda: preview_steps(b), "a first preview")
    seen = preview_steps(b)[0]
    b.wait(lambda: preview_steps(b)[0] > seen, "a newer preview")
    b.wait(lambda: points(b) >= 12 and b.js("return arguments[0].toDataURL()", chart) != first, "the chart to move on")
    assert re.fullmatch(r"\d+ / 100000", b.text("#st-step")), b.text("#st-step")
    assert "samples/s" in b.text("#st-speed") and re.fullmatch(r"\d+:\d\d(:\d\d)?", b.text("#st-eta"))
    assert b.text(f"{card(b, 'webcat')} .job-status") == "running"
    assert re.search(r"step \d+", b.text(f"#previews figure figcaption"))

    # a second job joins the group (co-batched, side by side); a third fails with its one line
    fill_job(b, "webdog")
    b.click("#start-btn")
    b.wait(lambda: "co-batched" in b.text(f"{card(b, 'webdog')} .job-status")
           and "co-batched" in b.text(f"{card(b, 'webcat')} .job-status"), "two co-batched runs")
    assert len(b.els("#jobs .job")) == 2
    b.shot("co-batched")
    b.open_details("#train-form details")
    fill_job(b, "webbad", **{"#f-lr": "1e30", "#f-steps": 50})
    b.tick("#f-allow_huge_lr")
    b.click("#start-btn")
    b.wait(lambda: status_of(b, "webbad") == "failed", "webbad failing")
    assert "NaN" in b.text(f"{card(b, 'webbad')} .job-err") and b.text(f"{card(b, 'webbad')} .job-status") == "failed"

    # stop, resume (the stream carries on), stop again
    b.click(f"{card(b, 'webdog')} .job-stop")
    b.click(f"{card(b, 'webcat')} .job-watch")
    b.wait(lambda: status_of(b, "webdog") == "cancelled", "webdog stopped")
    b.click("#watch-stop")
    b.wait(lambda: status_of(b, "webcat") == "cancelled", "webcat stopped")
    assert b.text(f"{card(b, 'webcat')} .job-status") == "stopped" and b.text("#st-status") == "stopped"
    stopped_at = int(b.text("#st-step").split(" / ")[0])
    b.click("#watch-resume")
    b.wait(lambda: int(b.el("#loss-chart").get_attribute("data-last-step") or 0) > stopped_at + 2,
           "the chart after resuming")
    readme = os.environ.get("TI_FAST_WEB_SCREENSHOT")
    if readme:          # the README's picture: webcat training again beside a stopped and a failed job
        d.set_window_size(1400, 1150)
        b.js("window.scrollTo(0, 0)")
        b.wait(lambda: int(b.el("#loss-chart").get_attribute("data-last-step") or 0) > stopped_at + 12,
               "the chart after the resize")
        d.save_screenshot(readme)
        d.set_window_size(1280, 900)
    b.click(f"{card(b, 'webcat')} .job-stop")
    b.wait(lambda: status_of(b, "webcat") == "cancelled", "webcat stopped again")
    b.shot("stopped")

    # the library lists the trained file with what inspect says; generate with it
    row = '#embeddings-table tr[data-file="webcat.pt"]'
    cells = b.wait(lambda: (lambda c: c if c and int(c[2] or 0) > stopped_at else None)(
        b.js("return Array.from(document.querySelectorAll(arguments[0])).map((td) => td.textContent)", f"{row} td")),
        "webcat.pt in the library at its last step")
    assert cells[0] == "webcat.pt" and cells[1] == "webcat" and cells[3] == "2" and "a1111-pt" in cells[-1] and "hash" in cells[-1]
    link = b.js("return document.querySelector(arguments[0]).href", f"{row} a.download")
    assert link == f"{server.url}/api/v1/embeddings/webcat.pt"
    with server.client() as c:
        assert c.get(link).content[:2] == b"PK"                 # the download: a torch zip archive
    b.click(f"{row} button.use")
    assert b.el("#g-prompt").get_attribute("value") == "webcat"
    info = generate(b, steps=2, seed=5)
    assert info.startswith("webcat") and "Seed: 5" in info and "Size: 64x64" in info and "TI hashes" in info
    b.shot("generated")

    # a phone: one column, nothing wider than the screen
    d.set_window_size(390, 844)
    b.wait(lambda: b.js("return document.documentElement.scrollWidth <= window.innerWidth"), "no sideways scrolling")
    b.shot("phone")

    assert b.foreign_requests() == []
    assert any(u.endswith("/events") for u in b.urls) and any(u.endswith(".png") for u in b.urls)
    assert b.script_errors() == []


def test_the_token_is_asked_once_and_kept_in_the_cookie(token_server, browser_for):
    b = browser_for(token_server)
    d = b.driver
    b.open(token_server.url + "/")
    b.wait(lambda: b.el("#login").is_displayed(), "the token form")
    assert "model" not in b.text("#server-model")
    b.shot("login")
    b.type("#login-token", "not-the-token")
    b.click("#login-btn")
    b.wait(lambda: b.text("#login-err") == "wrong token", "the refusal of a wrong token")
    b.type("#login-token", TOKEN)
    b.click("#login-btn")
    b.wait(lambda: ready(b) and not b.el("#login").is_displayed(), "the page after the token")
    assert "[" in b.text("#server-model") and b.el("#logout").is_displayed()
    cookie = {c["name"]: c for c in d.get_cookies()}["ti_fast_session"]
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and TOKEN not in cookie["value"]
    assert b.js("return document.cookie") == ""                      # HttpOnly: no script reads it

    d.refresh()                                                      # asked once: the cookie carries on
    b.wait(lambda: ready(b), "the page after a reload")
    assert not b.el("#login").is_displayed()
    b.type("#g-prompt", "a ring")
    assert "Steps: 1" in generate(b, steps=1)                       # behind the token: the API and the image

    b.click("#logout")
    b.wait(lambda: b.el("#login").is_displayed(), "the token form after logging out")
    assert "ti_fast_session" not in {c["name"] for c in d.get_cookies()}
    assert b.foreign_requests() == []
    assert b.script_errors() == []


# ---------------------------------------------------------------------------- over plain HTTP

def test_only_the_page_and_the_login_answer_without_the_token(token_server):
    with token_server.client() as c:
        page = c.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "default-src 'self'" in page.headers["content-security-policy"]
        assets = re.findall(r'(?:src|href)="(/static/web/[^"]+)"', page.text)
        assert {"/static/web/web.css", "/static/web/main.js"} <= set(assets)
        for f in sorted(WEB.iterdir()):
            r = c.get(f"/static/web/{f.name}")
            assert r.status_code == 200 and r.content == f.read_bytes(), f.name
        for js in WEB.glob("*.js"):                   # the modules import only each other, by relative path
            for target in re.findall(r'from\s+"([^"]+)"', js.read_text()):
                assert target.startswith("./") and (WEB / target[2:]).is_file(), (js.name, target)
        for path in ("/docs", "/static/docs.js", "/static/web/missing.js", "/api/v1/server", "/api/v1/jobs",
                     "/openapi.json", "/sdapi/v1/samplers"):
            assert c.get(path).status_code == 401, path
        assert c.get("/static/web/%2e%2e/docs.js").status_code == 400
        assert c.post("/api/v1/login", json={"token": TOKEN}).status_code == 200


def test_train_options_per_kind_and_errors_naming_their_field(server):
    with server.client() as c:
        hn = {o["key"]: o for o in c.get("/api/v1/train-options", params={"kind": "hypernetwork"}).json()}
        emb = {o["key"]: o for o in c.get("/api/v1/train-options").json()}
        assert hn["lr"]["default"] == "0.00001" and hn["template"]["default"] == "hypernetwork"
        assert emb["lr"]["default"] == "0.005" and "activation" not in emb
        assert hn["activation"]["choices"][:2] == ["linear", "relu"] and emb["latents"]["choices"] == ["once", "deterministic", "random"]
        assert "euler_a" in emb["preview_sampler"]["choices"]
        assert c.get("/api/v1/train-options", params={"kind": "lora"}).status_code == 400
        upload(c, "fieldrings")
        for bad, field in ((dict(lr="x"), "lr"), (dict(clip_grad="norm:x"), "clip_grad"), (dict(name="///"), "name")):
            r = c.post("/api/v1/jobs", json={"config": {**job_config("fieldjob", "fieldrings"), **bad}})
            assert r.status_code == 400 and r.json()["field"] == field, r.json()


def test_a_resumed_job_streams_its_new_run_not_its_old_end(server):
    with server.client() as c:
        upload(c, "resumerings")
        job = submit(c, job_config("webresume", "resumerings", steps=100000))
        wait_job(c, job["id"], step=2)
        c.post(f"/api/v1/jobs/{job['id']}/cancel")
        stopped = wait_job(c, job["id"])
        assert stopped["status"] == "cancelled"
        assert c.post(f"/api/v1/jobs/{job['id']}/resume").status_code == 200
        seen, event = [], None
        with c.stream("GET", f"/api/v1/jobs/{job['id']}/events", timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: "):
                    data = json.loads(line[6:])
                    seen.append((event, data.get("status"), data.get("step")))
                    if event != "job" and (event == "end" or (data.get("step") or 0) > stopped["step"]):
                        break
        assert seen[0][0] == "job" and seen[-1][0] != "end", seen
        # the old run's events (steps 1.., its `end`) are not replayed: the new run starts at its save
        assert all(step is None or step >= stopped["step"] for e, _, step in seen[1:] if e == "progress"), seen
        c.post(f"/api/v1/jobs/{job['id']}/cancel")
        assert wait_job(c, job["id"])["status"] == "cancelled"
