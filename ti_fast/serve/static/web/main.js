// The page at /: asks for the token when the server has one (once: the server keeps the session
// in its HttpOnly cookie), then starts the four parts — Train, Watch, Library, Generate — and
// polls the job list. Every request goes to this server's /api/v1, nowhere else.

import { api, onUnauthorized, $ } from "./api.js";
import { Jobs } from "./jobs.js";
import { Library, Generate } from "./library.js";
import { TrainForm } from "./train.js";

const POLL_MS = 3000;

const page = { started: false, timer: null, server: null };

function showLogin(message) {
  const box = $("#login");
  if (page.timer) {
    clearInterval(page.timer);
    page.timer = null;
  }
  $("#login-err").textContent = message || "";
  if (box.hidden) {
    box.hidden = false;
    $("#login-token").value = "";
    $("#login-token").focus();
  }
}

async function login(e) {
  e.preventDefault();
  const btn = $("#login-btn");
  btn.disabled = true;
  try {
    await api("/api/v1/login", { json: { token: $("#login-token").value } });
    $("#login").hidden = true;
    $("#login-token").value = "";
    await boot();
  } catch (err) {
    $("#login-err").textContent = err.message;
    $("#login-token").select();
  } finally {
    btn.disabled = false;
  }
}

async function logout() {
  await api("/api/v1/logout", { method: "POST" }).catch(() => null);
  showLogin("logged out");
}

async function boot() {
  let server;
  try {
    server = await api("/api/v1/server");
  } catch (e) {
    if (e.status === 401) return;             // the login form is up
    $("#server-model").textContent = `server: ${e.message}`;
    return;
  }
  page.server = server;
  const model = server.model ? `${server.model.name} [${server.model.hash}]` : "no model";
  const worker = server.worker && server.worker.error ? ` · worker: ${server.worker.error}` : "";
  $("#server-model").textContent = `${model} · v${server.version}${worker}`;
  $("#logout").hidden = !server.token_required;
  document.body.dataset.ready = "0";
  if (!page.started) {
    page.started = true;
    const jobs = new Jobs({ onEnded: () => library.refresh() });
    const generate = new Generate();
    const train = new TrainForm({
      onSubmitted: (job) => {
        jobs.added(job);
        $("#watch").scrollIntoView({ behavior: "smooth", block: "start" });
      },
      onLibraryChanged: () => library.refresh(),
    });
    const library = new Library({
      onChanged: (emb, hn) => train.setLibrary(emb, hn),
      use: (text) => generate.use(text),
      train: (kind, file) => train.startFrom(kind, file),
    });
    page.parts = { jobs, generate, train, library };
  }
  const { jobs, generate, train, library } = page.parts;
  await Promise.all([train.init(), generate.init(), library.refresh(), jobs.refresh()]);
  if (!page.timer) page.timer = setInterval(() => jobs.refresh().catch(() => null), POLL_MS);
  document.body.dataset.ready = "1";
}

onUnauthorized(() => showLogin());
$("#login-form").addEventListener("submit", login);
$("#logout").addEventListener("click", logout);
boot();
