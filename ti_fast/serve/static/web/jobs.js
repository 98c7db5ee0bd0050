// Watch: every job as a card side by side (status, step, speed, ETA, a small loss chart, the
// newest preview, stop / resume / forget), and the selected one in full: the big loss chart and
// its previews as they are written. Fed by each active job's Server-Sent Events stream
// (/api/v1/jobs/ID/events); the job list is polled too, for the jobs without a stream.

import { api, h, $, duration, num } from "./api.js";
import { LossChart } from "./chart.js";

const ACTIVE = ["queued", "running"];
const TERMINAL = ["completed", "cancelled", "interrupted", "failed"];
const MAX_STREAMS = 4;     // a browser opens 6 HTTP/1.1 connections a host: leave room for requests
const SHOWN = 12;          // cards shown before "show all"
const GALLERY = 24;        // previews kept on the page for the watched job
const PREVIEW_STEP = /-(\d+)\.png$/;

const LABELS = { queued: "queued", running: "running", completed: "done", cancelled: "stopped",
                 interrupted: "interrupted", failed: "failed" };

class Job {
  constructor(rec) {
    this.rec = rec;
    this.pts = [];             // [{step, loss, lr}] by step
    this.maxStep = -Infinity;
    this.version = 0;          // bumped when pts change (a chart redraws only then)
    this.previews = new Map(); // step -> url
    this.newest = -1;          // the step of the newest preview
    this.live = null;          // the last progress event
    this.es = null;            // its EventSource while active
    this.history = null;       // the promise of its loss curve and previews, once asked
    this.stopping = false;
    this.el = null;
    this.chart = null;
    this.drawn = -1;
  }

  get id() { return this.rec.id; }

  add(step, loss, lr) {
    if (step === null || step === undefined || step <= this.maxStep) return;   // a replayed event
    if ((loss === null || loss === undefined) && (lr === null || lr === undefined)) return;
    this.pts.push({ step, loss, lr });
    this.maxStep = step;
    this.version++;
  }

  merge(rows) {
    const byStep = new Map(this.pts.map((p) => [p.step, p]));
    for (const [step, , , loss, lr] of rows) if (!byStep.has(step)) byStep.set(step, { step, loss, lr });
    this.pts = Array.from(byStep.values()).sort((a, b) => a.step - b.step);
    this.maxStep = this.pts.length ? this.pts[this.pts.length - 1].step : -Infinity;
    this.version++;
  }
}

export class Jobs {
  /** onEnded(job): a job finished (the library has a new file). */
  constructor({ onEnded } = {}) {
    this.jobs = new Map();
    this.selected = null;
    this.showAll = false;
    this.onEnded = onEnded || (() => {});
    this.dirty = new Set();
    this.frame = false;
    this.chart = new LossChart($("#loss-chart"));
    this.gallery = $("#previews");
    this.galleryOf = null;
    $("#smoothing").addEventListener("input", (e) => {
      this.chart.setSmoothing(e.target.value);
      for (const j of this.jobs.values()) if (j.chart) j.chart.setSmoothing(e.target.value);
    });
    $("#watch-stop").addEventListener("click", () => this.selected && this.stop(this.jobs.get(this.selected)));
    $("#watch-resume").addEventListener("click", () => this.selected && this.resume(this.jobs.get(this.selected)));
  }

  /** Poll: the server's job list (new jobs from other clients, the status of jobs without a stream). */
  async refresh() {
    const list = await api("/api/v1/jobs");
    const seen = new Set();
    for (const rec of list) {
      seen.add(rec.id);
      this.upsert(rec);
    }
    for (const id of Array.from(this.jobs.keys())) if (!seen.has(id)) this.remove(id);
    this.layout();
    if (!this.selected && list.length) {
      const active = list.filter((r) => ACTIVE.includes(r.status));
      this.select((active.length ? active : list)[(active.length ? active : list).length - 1].id);
    }
  }

  /** A job the page itself submitted: shown and watched at once. */
  added(rec) {
    this.upsert(rec);
    this.layout();
    this.select(rec.id);
  }

  upsert(rec) {
    let job = this.jobs.get(rec.id);
    if (!job) {
      job = new Job(rec);
      this.jobs.set(rec.id, job);
      this.buildCard(job);
    } else {
      const live = job.es && job.rec.status === "running" && rec.status === "running";
      // a polled record lags behind the stream: keep the stream's step
      job.rec = live ? { ...rec, step: Math.max(rec.step || 0, job.rec.step || 0) } : rec;
    }
    if (ACTIVE.includes(job.rec.status)) this.connect(job);
    else job.stopping = false;
    this.changed(job);
    return job;
  }

  remove(id) {
    const job = this.jobs.get(id);
    if (!job) return;
    this.disconnect(job);
    job.el.remove();
    this.jobs.delete(id);
    if (this.selected === id) this.selected = null;
  }

  // ------------------------------------------------------------------ streams
  connect(job) {
    if (job.es) return;
    let open = 0;
    for (const j of this.jobs.values()) if (j.es) open++;
    if (open >= MAX_STREAMS) return;            // polled until a stream frees up
    const es = new EventSource(job.rec.links.events);
    job.es = es;
    const data = (e) => { try { return JSON.parse(e.data); } catch (err) { return {}; } };
    es.addEventListener("job", (e) => {
      const rec = data(e);
      if (rec && rec.id) { job.rec = { ...job.rec, ...rec }; this.changed(job); }
    });
    es.addEventListener("status", (e) => {
      const d = data(e);
      if (d.status) job.rec.status = d.status;
      if (d.group) job.rec.group = d.group;
      this.changed(job);
    });
    es.addEventListener("progress", (e) => this.progress(job, data(e)));
    es.addEventListener("end", (e) => this.ended(job, data(e)));
    es.onerror = () => {
      if (es.readyState === EventSource.CLOSED && job.es === es) job.es = null;   // the poll takes over
    };
    this.loadHistory(job);
  }

  disconnect(job) {
    if (job.es) {
      job.es.close();
      job.es = null;
    }
  }

  progress(job, d) {
    job.live = d;
    job.add(d.step, d.loss, d.lr);
    if (d.preview) this.addPreview(job, d.preview, d.step);
    const r = job.rec;
    if (!TERMINAL.includes(r.status)) r.status = "running";
    for (const k of ["step", "end_step", "loss", "lr"]) if (d[k] !== null && d[k] !== undefined) r[k] = d[k];
    if (d.active_runs > (r.peak_runs || 0)) r.peak_runs = d.active_runs;
    this.changed(job);
  }

  async ended(job, d) {
    this.disconnect(job);
    job.stopping = false;
    if (d.status && LABELS[d.status]) job.rec.status = d.status;
    if (d.error !== undefined) job.rec.error = d.error;
    if (d.step !== null && d.step !== undefined) job.rec.step = d.step;
    job.live = job.live ? { ...job.live, eta_s: null } : null;
    this.changed(job);
    try {
      const rec = await api(`/api/v1/jobs/${job.id}`);
      this.upsert(rec);
    } catch (e) { /* the poll tries again */ }
    this.onEnded(job);
  }

  async loadHistory(job) {
    if (job.history) return job.history;
    job.history = Promise.all([api(job.rec.links.loss), api(job.rec.links.previews)]).then(([loss, previews]) => {
      job.merge(loss.rows || []);
      for (const p of previews) this.addPreview(job, p.url, p.step);
      this.changed(job);
    }).catch(() => { job.history = null; });
    return job.history;
  }

  addPreview(job, url, step) {
    const m = PREVIEW_STEP.exec(url);
    const s = m ? Number(m[1]) : step;
    if (job.previews.has(s)) return;
    job.previews.set(s, url);
    if (s > job.newest) job.newest = s;
    if (this.selected === job.id && this.galleryOf === job.id) this.prependFigure(s, url);
  }

  // ------------------------------------------------------------------ actions
  async stop(job) {
    if (!job) return;
    job.stopping = job.rec.status === "running";
    this.changed(job);
    try {
      this.upsert(await api(job.rec.links.cancel, { method: "POST" }));
    } catch (e) {
      job.stopping = false;
      this.say(job, e.message);
    }
  }

  async resume(job) {
    if (!job) return;
    try {
      this.disconnect(job);
      this.upsert(await api(job.rec.links.resume, { method: "POST" }));
    } catch (e) {
      this.say(job, e.message);
    }
  }

  async forget(job) {
    try {
      await api(`/api/v1/jobs/${job.id}`, { method: "DELETE" });
      this.remove(job.id);
      this.layout();
    } catch (e) {
      this.say(job, e.message);
    }
  }

  say(job, msg) {
    job.el.querySelector(".job-err").textContent = msg;
  }

  select(id) {
    const job = this.jobs.get(id);
    if (!job) return;
    this.selected = id;
    for (const j of this.jobs.values()) j.el.classList.toggle("selected", j.id === id);
    this.galleryOf = null;
    this.loadHistory(job);
    this.changed(job);
  }

  // ------------------------------------------------------------------ drawing
  changed(job) {
    this.dirty.add(job);
    if (this.frame) return;
    this.frame = true;
    requestAnimationFrame(() => {
      this.frame = false;
      const dirty = Array.from(this.dirty);
      this.dirty.clear();
      for (const j of dirty) if (this.jobs.has(j.id)) this.renderCard(j);
      const sel = this.jobs.get(this.selected);
      if (sel && dirty.includes(sel)) this.renderWatch(sel);
    });
  }

  buildCard(job) {
    const canvas = h("canvas", { class: "chart mini", "aria-hidden": "true" });
    const el = h("article", { class: "job card", dataset: { id: job.id } },
      h("header", {},
        h("strong", { class: "job-name" }, job.rec.name),
        h("span", { class: "muted job-kind" }, job.rec.kind),
        h("span", { class: "badge job-status" })),
      h("div", { class: "job-visual" }, canvas, h("img", { class: "job-thumb", alt: "newest preview", hidden: true })),
      h("progress", { class: "job-progress", max: 1, value: 0 }),
      h("p", { class: "job-line" }),
      h("p", { class: "err job-err" }),
      h("div", { class: "row job-actions" },
        h("button", { type: "button", class: "small job-watch", onclick: () => this.select(job.id) }, "Watch"),
        h("button", { type: "button", class: "small job-stop", onclick: () => this.stop(job) }, "Stop"),
        h("button", { type: "button", class: "small job-resume", onclick: () => this.resume(job) }, "Resume"),
        h("button", { type: "button", class: "small job-forget", onclick: () => this.forget(job) }, "Forget"),
        h("a", { class: "job-download", hidden: true, download: "" }, "download")));
    el.addEventListener("click", (e) => { if (!e.target.closest("button, a")) this.select(job.id); });
    job.el = el;
    job.chart = new LossChart(canvas, { mini: true });
    job.chart.setSmoothing($("#smoothing").value);
  }

  layout() {
    const box = $("#jobs");
    const all = Array.from(this.jobs.values()).sort((a, b) => (b.rec.created || 0) - (a.rec.created || 0));
    const shown = this.showAll ? all : all.slice(0, SHOWN);
    const empty = box.querySelector(".empty");
    if (empty) empty.hidden = all.length > 0;
    for (const j of all) if (!shown.includes(j) && j.el.parentNode) j.el.remove();
    shown.forEach((j, i) => {
      if (box.children[i + 1] !== j.el) box.insertBefore(j.el, box.children[i + 1] || null);
    });
    let more = box.querySelector(".show-all");
    if (all.length > SHOWN) {
      if (!more) {
        more = h("button", { type: "button", class: "small show-all", onclick: () => { this.showAll = !this.showAll; this.layout(); } });
        box.append(more);
      }
      more.textContent = this.showAll ? "Show the newest only" : `Show all ${all.length} jobs`;
      box.append(more);
    } else if (more) {
      more.remove();
    }
    for (const j of shown) if (!j.history) this.loadHistory(j);
  }

  statusText(job) {
    const r = job.rec, live = job.live;
    if (r.status === "running") {
      if (job.stopping) return "stopping (saving)";
      const runs = (live && live.active_runs) || 0;
      return runs > 1 ? `co-batched · ${runs} runs` : "running";
    }
    if (r.status === "queued") return r.resume ? "queued (resumes from its save)" : "queued";
    return LABELS[r.status] || r.status;
  }

  detail(job) {
    const r = job.rec, live = job.live;
    const parts = [];
    if (r.step !== null && r.step !== undefined) parts.push(`step ${r.step}${r.end_step ? ` / ${r.end_step}` : ""}`);
    if (r.status === "running" && live && live.samples_per_s) parts.push(`${num(live.samples_per_s, 3)} samples/s`);
    if (r.status === "running" && live && live.eta_s !== null && live.eta_s !== undefined) parts.push(`ETA ${duration(live.eta_s)}`);
    if (r.loss !== null && r.loss !== undefined) parts.push(`loss ${num(r.loss)}`);
    if (TERMINAL.includes(r.status) && r.co_batched) parts.push(`co-batched (up to ${r.peak_runs} runs)`);
    return parts.join(" · ");
  }

  renderCard(job) {
    const r = job.rec, el = job.el;
    el.dataset.status = r.status;
    const badge = el.querySelector(".job-status");
    badge.textContent = this.statusText(job);
    badge.className = `badge job-status status-${r.status}${job.live && job.live.active_runs > 1 && r.status === "running" ? " co-batched" : ""}`;
    el.querySelector(".job-line").textContent = this.detail(job);
    el.querySelector(".job-err").textContent = r.status === "failed" ? (r.error || "failed") : "";
    const bar = el.querySelector(".job-progress");
    bar.max = r.end_step || 1;
    bar.value = Math.min(r.step || 0, bar.max);
    el.querySelector(".job-stop").hidden = !ACTIVE.includes(r.status) || job.stopping;
    el.querySelector(".job-resume").hidden = !["cancelled", "interrupted", "failed"].includes(r.status);
    el.querySelector(".job-forget").hidden = !TERMINAL.includes(r.status);
    const dl = el.querySelector(".job-download");
    const file = r.files && (r.files.embedding || r.files.hypernetwork);
    dl.hidden = !file;
    if (file) {
      dl.href = file;
      dl.textContent = `${r.name}.pt`;
    }
    const thumb = el.querySelector(".job-thumb");
    if (job.newest >= 0) {
      const last = job.previews.get(job.newest);
      if (thumb.getAttribute("src") !== last) thumb.src = last;
      thumb.hidden = false;
    }
    if (job.drawn !== job.version) {
      job.drawn = job.version;
      job.chart.set(job.pts);
    }
  }

  renderWatch(job) {
    const r = job.rec, live = job.live || {};
    $("#watch-title").textContent = `${r.name} · ${r.kind} · job ${r.id}`;
    $("#st-status").textContent = this.statusText(job);
    $("#st-status").className = `status-${r.status}`;
    $("#st-step").textContent = r.step !== null && r.step !== undefined ? `${r.step} / ${r.end_step || "?"}` : "–";
    const running = r.status === "running";
    $("#st-speed").textContent = running && live.samples_per_s ? `${num(live.samples_per_s, 3)} samples/s` : "–";
    $("#st-eta").textContent = running ? duration(live.eta_s) : (r.status === "completed" ? "done" : "–");
    $("#st-loss").textContent = num(r.loss);
    $("#st-lr").textContent = num(r.lr);
    const bar = $("#st-progress");
    bar.max = r.end_step || 1;
    bar.value = Math.min(r.step || 0, bar.max);
    $("#st-error").textContent = r.status === "failed" ? `failed: ${r.error || "no reason given"}` : "";
    $("#watch-stop").hidden = !ACTIVE.includes(r.status) || job.stopping;
    $("#watch-resume").hidden = !["cancelled", "interrupted", "failed"].includes(r.status);
    if (this.chart.shown !== job.id || this.chart.version !== job.version) {
      this.chart.shown = job.id;
      this.chart.version = job.version;
      this.chart.set(job.pts);
    }
    if (this.galleryOf !== job.id) this.fillGallery(job);
  }

  fillGallery(job) {
    this.galleryOf = job.id;
    for (const f of Array.from(this.gallery.querySelectorAll("figure"))) f.remove();
    const steps = Array.from(job.previews.keys()).sort((a, b) => a - b).slice(-GALLERY);
    for (const s of steps) this.prependFigure(s, job.previews.get(s));
    this.gallery.querySelector(".empty").hidden = steps.length > 0;
  }

  prependFigure(step, url) {
    const fig = h("figure", { class: "preview", dataset: { step } },
      h("a", { href: url, target: "_blank", rel: "noopener" }, h("img", { src: url, alt: `preview at step ${step}` })),
      h("figcaption", {}, `step ${step}`));
    // newest first: before the first figure of an earlier step
    const after = Array.from(this.gallery.querySelectorAll("figure")).find((f) => Number(f.dataset.step) < step);
    this.gallery.insertBefore(fig, after || null);
    const figs = this.gallery.querySelectorAll("figure");
    for (let i = GALLERY; i < figs.length; i++) figs[i].remove();
    this.gallery.querySelector(".empty").hidden = true;
  }
}
