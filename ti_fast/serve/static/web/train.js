// Train: choose or upload a dataset (drop images and captions, a folder or a zip), create or pick
// an embedding or a hypernetwork, the main options with the defaults the server reports
// (/api/v1/train-options: the CLI's own), and start. Every check is the server's: its one-line
// error appears beside the field it names.

import { api, upload, h, $, $$, bytes, count, showError, clearErrors } from "./api.js";

// Which settings the form offers, in which group, with what label. Values, types, defaults and
// choices come from the server.
const NEW = [["init_text", "Initialization text"], ["vectors", "Vectors per token"],
             ["layer_structure", "Layer structure"], ["activation", "Activation"], ["init", "Weight initialization"],
             ["layer_norm", "Layer normalization"], ["use_dropout", "Dropout"]];
const MAIN = [["steps", "Steps (total)"], ["lr", "Learning rate (or a schedule: 0.005:100, 1e-3)"],
              ["batch_size", "Batch size"], ["grad_accum", "Gradient accumulation"], ["width", "Width"],
              ["height", "Height"], ["template", "Prompt template"],
              ["save_every", "Save a copy every N steps (0: the end only)"]];
const PREVIEW = [["preview_every", "Preview every N steps (0: none)"],
                 ["preview_prompt", "Preview prompt (empty: a training prompt)"], ["preview_steps", "Sampling steps"],
                 ["preview_sampler", "Sampler"], ["preview_seed", "Seed"], ["preview_cfg", "CFG scale"]];
const MORE = [["seed", "Seed (empty: drawn once)"], ["shuffle_tags", "Shuffle tags"], ["tag_dropout", "Tag dropout"],
              ["latents", "Latent sampling"], ["clip_grad", "Gradient clipping (value:X or norm:X)"],
              ["resize", "Resize"], ["flip", "Flipped copies"], ["buckets", "Aspect-ratio buckets"],
              ["optimizer", "Optimizer"], ["preview_negative", "Preview negative prompt"],
              ["png_embed", "Embedding inside preview PNGs"], ["dropout_structure", "Dropout structure"],
              ["activate_output", "Activate the output"], ["overwrite", "Overwrite an existing output"],
              ["allow_huge_lr", "Allow a learning rate over 1"]];
const EMBEDDING_ONLY = ["init_text", "vectors", "png_embed", "embedding"];
const STRUCTURE = ["layer_structure", "activation", "init", "layer_norm", "use_dropout", "dropout_structure",
                   "activate_output", "sizes", "last_layer_dropout"];
const IMAGE = /\.(png|jpe?g|webp|bmp|gif|tiff?)$/i;
const CAPTION = /\.(txt|caption)$/i;

export class TrainForm {
  /** onSubmitted(job record); onLibraryChanged(): a file was created. */
  constructor({ onSubmitted, onLibraryChanged }) {
    this.form = $("#train-form");
    this.onSubmitted = onSubmitted;
    this.onLibraryChanged = onLibraryChanged;
    this.options = {};        // kind -> {key: {type, default, choices}}
    this.inputs = {};         // key -> input element
    this.picked = [];
    this.library = { embedding: [], hypernetwork: [] };
    this.form.addEventListener("submit", (e) => { e.preventDefault(); this.submit(); });
    for (const r of $$('input[name="kind"]', this.form)) r.addEventListener("change", () => this.setKind(r.value));
    $("#start").addEventListener("change", () => this.startChanged());
    $("#reset-btn").addEventListener("click", () => this.reset());
    $("#create-btn").addEventListener("click", () => this.create());
    this.wireUpload();
  }

  get kind() {
    return $('input[name="kind"]:checked', this.form).value;
  }

  async init() {
    const [emb, hn, templates, samplers] = await Promise.all([
      api("/api/v1/train-options?kind=embedding"), api("/api/v1/train-options?kind=hypernetwork"),
      api("/api/v1/templates"), api("/api/v1/samplers")]);
    for (const [kind, list] of [["embedding", emb], ["hypernetwork", hn]]) {
      this.options[kind] = Object.fromEntries(list.filter((o) => !o.process_wide).map((o) => [o.key, o]));
    }
    this.templates = [...templates.builtin, ...templates.files];
    this.samplerLabels = Object.fromEntries(samplers.map((s) => [s.key, s.label]));
    this.build();
    await this.refreshDatasets();
  }

  // ------------------------------------------------------------------ fields
  build() {
    const groups = [["#fields-new", NEW], ["#fields-main", MAIN], ["#fields-preview", PREVIEW], ["#fields-more", MORE]];
    for (const [sel, specs] of groups) {
      const box = $(sel);
      box.textContent = "";
      for (const [key, label] of specs) {
        const spec = this.options.embedding[key] || this.options.hypernetwork[key];
        if (spec) box.append(this.field(key, label, spec));
      }
    }
    this.setKind(this.kind);
  }

  field(key, label, spec) {
    const type = String(spec.type).replace(" | None", "");
    let input;
    if (type === "bool") {
      input = h("input", { type: "checkbox", name: key });
    } else if (spec.choices || key === "template") {
      const choices = key === "template" ? this.templates : spec.choices;
      input = h("select", { name: key }, choices.map((c) => h("option", { value: c }, this.choiceLabel(key, c))));
    } else {
      input = h("input", { type: "text", name: key, autocomplete: "off", spellcheck: "false",
                           inputmode: type === "int" ? "numeric" : type === "float" ? "decimal" : null });
    }
    input.id = `f-${key}`;
    input.dataset.type = type;
    input.addEventListener("input", () => { input.dataset.edited = "1"; });
    input.addEventListener("change", () => { input.dataset.edited = "1"; });
    this.inputs[key] = input;
    const cls = type === "bool" ? "field check" : "field";
    return h("label", { class: cls, dataset: { key } },
      type === "bool" ? [input, h("span", {}, label)] : [h("span", {}, label), input],
      h("small", { class: "err", dataset: { for: key } }));
  }

  choiceLabel(key, value) {
    if (key === "preview_sampler" && this.samplerLabels[value]) return `${this.samplerLabels[value]} (${value})`;
    return value;
  }

  spec(key) {
    return this.options[this.kind][key];
  }

  setValue(key, value) {
    const input = this.inputs[key];
    if (!input) return;
    if (input.type === "checkbox") input.checked = Boolean(value);
    else input.value = value === null || value === undefined ? "" : String(value);
    const spec = this.spec(key);
    if (input.tagName === "INPUT" && input.type === "text") {
      input.placeholder = spec && spec.default === null ? (key === "seed" ? "random" : "none") : "";
    }
  }

  setKind(kind) {
    for (const [key, input] of Object.entries(this.inputs)) {
      const spec = this.spec(key);
      if (spec && !input.dataset.edited) this.setValue(key, spec.default);
    }
    this.fillStart();
    this.visibility();
  }

  visibility() {
    const fresh = !$("#start").value;
    for (const [key, input] of Object.entries(this.inputs)) {
      const known = Boolean(this.spec(key)) && !(this.kind === "hypernetwork" && EMBEDDING_ONLY.includes(key));
      const shape = STRUCTURE.includes(key) || key === "init_text" || key === "vectors";
      input.closest(".field").hidden = !known || (shape && !fresh);
    }
    $("#create-btn").hidden = !fresh;
  }

  reset() {
    for (const input of Object.values(this.inputs)) delete input.dataset.edited;
    this.setKind(this.kind);
    clearErrors(this.form, $("#train-err"));
  }

  /** The job's config: the name, the dataset, and every shown setting that differs from its default. */
  config() {
    const cfg = {};
    const name = $("#f-name").value.trim();
    if (name) cfg.name = name;
    const data = $("#dataset").value;
    if (data) cfg.data = data;
    const start = $("#start").value;
    if (start) cfg[this.kind] = start;
    for (const [key, input] of Object.entries(this.inputs)) {
      if (input.closest(".field").hidden) continue;
      const spec = this.spec(key);
      const value = this.read(input);
      if (value === undefined) continue;
      if (spec && spec.default !== null && String(value) === String(spec.default)) continue;
      cfg[key] = value;
    }
    return cfg;
  }

  /** An input's value as JSON: a number where it reads as one (else the text: the server says why). */
  read(input) {
    if (input.type === "checkbox") return input.checked;
    const v = input.value.trim();
    if (v === "") return undefined;
    const t = input.dataset.type;
    if (t === "int" && /^[+-]?\d+$/.test(v)) return Number(v);
    if (t === "float" && v !== "" && isFinite(Number(v))) return Number(v);
    return v;
  }

  async submit() {
    const err = $("#train-err");
    clearErrors(this.form, err);
    const btn = $("#start-btn");
    btn.disabled = true;
    try {
      const job = await api("/api/v1/jobs", { json: { kind: this.kind, config: this.config() } });
      this.onSubmitted(job);
      err.textContent = "";
    } catch (e) {
      showError(this.form, err, e);
    } finally {
      btn.disabled = false;
    }
  }

  // ------------------------------------------------------------------ create or pick
  setLibrary(embeddings, hypernetworks) {
    this.library = { embedding: embeddings.filter((e) => !e.error), hypernetwork: hypernetworks.filter((e) => !e.error) };
    this.fillStart();
  }

  fillStart() {
    const sel = $("#start"), keep = sel.value;
    sel.textContent = "";
    sel.append(h("option", { value: "" }, `a new ${this.kind}`));
    for (const f of this.library[this.kind] || []) {
      const bits = [f.step !== undefined && f.step !== null ? `step ${f.step}` : null,
                    f.vectors ? count(f.vectors, "vector") : null].filter(Boolean).join(", ");
      sel.append(h("option", { value: f.file }, bits ? `${f.file} (${bits})` : f.file));
    }
    sel.value = Array.from(sel.options).some((o) => o.value === keep) ? keep : "";
    this.visibility();
  }

  /** "Train more" in the library: this kind, starting from that file. */
  startFrom(kind, file) {
    const radio = $(`input[name="kind"][value="${kind}"]`, this.form);
    if (radio && !radio.checked) {
      radio.checked = true;
      this.setKind(kind);
    }
    $("#start").value = file;
    $("#f-name").value = "";
    this.startChanged();
    $("#train").scrollIntoView({ behavior: "smooth", block: "start" });
  }

  startChanged() {
    const file = $("#start").value;
    const name = $("#f-name");
    if (file && !name.value.trim()) name.value = file.replace(/\.[^.]+$/, "");
    this.visibility();
  }

  async create() {
    const status = $("#create-status"), err = $("#create-err");
    clearErrors(this.form, err);
    status.textContent = "";
    const body = { name: $("#f-name").value.trim() };
    const keys = this.kind === "embedding" ? ["init_text", "vectors"]
      : ["layer_structure", "activation", "init", "layer_norm", "use_dropout", "dropout_structure", "activate_output"];
    for (const key of keys) {
      const input = this.inputs[key];
      const v = input ? this.read(input) : undefined;
      if (v !== undefined) body[key] = v;
    }
    try {
      const made = await api(`/api/v1/${this.kind === "embedding" ? "embeddings" : "hypernetworks"}`, { json: body });
      await this.onLibraryChanged();
      $("#start").value = made.file;
      this.visibility();
      status.textContent = `created ${made.file}`;
    } catch (e) {
      showError(this.form, err, e);
    }
  }

  // ------------------------------------------------------------------ datasets
  async refreshDatasets(select) {
    const list = await api("/api/v1/datasets");
    const sel = $("#dataset"), keep = select || sel.value;
    sel.textContent = "";
    sel.append(h("option", { value: "" }, list.length ? "(choose a dataset)" : "(upload one below)"));
    for (const d of list) {
      sel.append(h("option", { value: d.name }, `${d.name} · ${count(d.images, "image")}, ${count(d.captions, "caption")}`));
    }
    if (list.some((d) => d.name === keep)) sel.value = keep;
    else if (list.length === 1) sel.value = list[0].name;
  }

  wireUpload() {
    const zone = $("#dropzone"), input = $("#upload-files"), name = $("#upload-name");
    input.addEventListener("change", () => this.pick(Array.from(input.files), null));
    zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
    zone.addEventListener("dragleave", () => zone.classList.remove("over"));
    zone.addEventListener("drop", async (e) => {
      e.preventDefault();
      zone.classList.remove("over");
      const { files, folder } = await dropped(e.dataTransfer);
      this.pick(files, folder);
    });
    name.addEventListener("input", () => this.uploadReady());
    $("#upload-btn").addEventListener("click", () => this.send());
  }

  pick(files, folder) {
    this.picked = files;
    const zips = files.filter((f) => /\.zip$/i.test(f.name));
    const images = files.filter((f) => IMAGE.test(f.name)).length;
    const captions = files.filter((f) => CAPTION.test(f.name)).length;
    const other = files.length - zips.length - images - captions;
    const total = files.reduce((n, f) => n + f.size, 0);
    $("#upload-picked").textContent = files.length
      ? [zips.length ? count(zips.length, "zip") : null, images ? count(images, "image") : null,
         captions ? count(captions, "caption") : null, other ? count(other, "other file") : null]
        .filter(Boolean).join(", ")
        + ` (${bytes(total)})`
      : "";
    const name = $("#upload-name");
    if (!name.value.trim()) {
      const guess = folder || (zips.length === 1 ? zips[0].name.replace(/\.zip$/i, "") : "");
      name.value = guess.replace(/[^A-Za-z0-9._ -]/g, "_");
    }
    $("#upload-err").textContent = "";
    this.uploadReady();
  }

  uploadReady() {
    $("#upload-btn").disabled = !(this.picked.length && $("#upload-name").value.trim());
  }

  async send() {
    const name = $("#upload-name").value.trim(), err = $("#upload-err"), status = $("#upload-status");
    const bar = $("#upload-progress"), btn = $("#upload-btn");
    err.textContent = "";
    status.textContent = "";
    const form = new FormData();
    for (const f of this.picked) form.append("files", f, f.name);
    btn.disabled = true;
    bar.hidden = false;
    bar.value = 0;
    const replace = $("#upload-replace").checked ? "?replace=true" : "";
    try {
      const d = await upload(`/api/v1/datasets/${encodeURIComponent(name)}${replace}`, form, (x) => { bar.value = x; });
      const skipped = d.skipped && d.skipped.length ? ` (skipped: ${d.skipped.join(", ")})` : "";
      this.picked = [];
      $("#upload-files").value = "";
      $("#upload-name").value = "";
      $("#upload-picked").textContent = "";
      await this.refreshDatasets(d.name);
      status.textContent = `${d.name}: ${count(d.images, "image")}, ${count(d.captions, "caption")}${skipped}`;
    } catch (e) {
      err.textContent = e.message;
    } finally {
      bar.hidden = true;
      this.uploadReady();
    }
  }
}

/** The files of a drop, folders walked (Chromium and Firefox both offer webkitGetAsEntry). */
async function dropped(dt) {
  const entries = Array.from(dt.items || []).map((i) => (i.webkitGetAsEntry ? i.webkitGetAsEntry() : null));
  if (!entries.length || entries.some((e) => !e)) return { files: Array.from(dt.files || []), folder: null };
  const files = [];
  const folder = entries.length === 1 && entries[0].isDirectory ? entries[0].name : null;
  async function walk(entry) {
    if (entry.isFile) {
      files.push(await new Promise((ok, bad) => entry.file(ok, bad)));
    } else if (entry.isDirectory) {
      const reader = entry.createReader();
      for (;;) {
        const batch = await new Promise((ok, bad) => reader.readEntries(ok, bad));
        if (!batch.length) break;
        for (const e of batch) await walk(e);
      }
    }
  }
  for (const e of entries) await walk(e);
  return { files, folder };
}
