// Use: the library of embeddings and hypernetworks (download links and what `ti-fast inspect`
// says of each file), and a small txt2img box to try them: the image with its infotext.

import { api, h, $, bytes, num, showError, clearErrors } from "./api.js";

const HIDDEN_KEYS = ["url", "path", "file"];
const KEEP_RESULTS = 6;

function inspectList(entry) {
  const dl = h("dl", { class: "inspect" });
  for (const [k, v] of Object.entries(entry)) {
    if (HIDDEN_KEYS.includes(k) || v === null || v === undefined || (Array.isArray(v) && !v.length)) continue;
    dl.append(h("dt", {}, k), h("dd", {}, typeof v === "object" ? JSON.stringify(v) : String(v)));
  }
  return h("details", {}, h("summary", {}, "inspect"), dl);
}

export class Library {
  /** onChanged(embeddings, hypernetworks); use(text): put text into the prompt; train(kind, file). */
  constructor({ onChanged, use, train }) {
    this.onChanged = onChanged;
    this.use = use;
    this.train = train;
    $("#lib-refresh").addEventListener("click", () => this.refresh());
  }

  async refresh() {
    const err = $("#lib-err");
    try {
      const [emb, hn] = await Promise.all([api("/api/v1/embeddings"), api("/api/v1/hypernetworks")]);
      this.table($("#embeddings-table"), emb, "embedding");
      this.table($("#hypernetworks-table"), hn, "hypernetwork");
      err.textContent = "";
      this.onChanged(emb, hn);
    } catch (e) {
      err.textContent = e.message;
    }
  }

  table(t, list, kind) {
    const seen = JSON.stringify(list);
    if (t.dataset.shown === seen) return;       // unchanged: an open "inspect" stays open
    t.dataset.shown = seen;
    t.textContent = "";
    const head = kind === "embedding"
      ? ["File", "Trigger", "Step", "Vectors", "Model", "Format", "Size", ""]
      : ["File", "Name", "Step", "Structure", "Parameters", "Model", "Size", ""];
    t.append(h("thead", {}, h("tr", {}, head.map((x) => h("th", {}, x)))));
    const body = h("tbody");
    if (!list.length) {
      body.append(h("tr", {}, h("td", { colspan: head.length, class: "muted" },
        kind === "embedding" ? "No embeddings yet: train or create one." : "No hypernetworks yet.")));
    }
    for (const e of list) {
      const link = h("a", { href: e.url, download: e.file, class: "download" }, e.file);
      const use = kind === "embedding" ? e.name : `<hypernet:${e.name}:1>`;
      const actions = h("td", { class: "actions" },
        e.error ? null : h("button", { type: "button", class: "small use", title: `add ${use} to the prompt`,
                                       onclick: () => this.use(use) }, "Use"),
        e.error ? null : h("button", { type: "button", class: "small train-from",
                                       onclick: () => this.train(kind, e.file) }, "Train more"),
        inspectList(e));
      const model = e.sd_checkpoint_name || e.family || "";
      const cells = kind === "embedding"
        ? [link, e.name || "", e.step ?? "", e.vectors ?? "", model, e.format || "", bytes(e.size)]
        : [link, e.name || "", e.step ?? "",
           e.layer_structure ? `${e.layer_structure.join(",")} ${e.activation_func || ""}` : "",
           e.parameters ? num(e.parameters) : "", model, bytes(e.size)];
      const row = h("tr", { dataset: { file: e.file } }, cells.map((c) => h("td", {}, c)), actions);
      if (e.error) row.append(h("td", { class: "err", colspan: head.length }, e.error));
      body.append(row);
    }
    t.append(body);
  }
}

export class Generate {
  constructor() {
    this.form = $("#gen-form");
    this.inputs = {};
    this.form.addEventListener("submit", (e) => { e.preventDefault(); this.run(); });
  }

  /** The fields with the defaults of the server's own request model (Txt2Img in /openapi.json). */
  async init() {
    const [spec, samplers] = await Promise.all([api("/openapi.json"), api("/api/v1/samplers")]);
    const props = ((spec.components || {}).schemas || {}).Txt2Img;
    const p = (props && props.properties) || {};
    const main = $("#gen-fields"), more = $("#gen-more");
    main.textContent = "";
    more.textContent = "";
    const field = (key, label, box, input) => {
      input.name = key;
      input.id = `g-${key}`;
      const d = p[key] ? p[key].default : undefined;
      if (input.tagName === "SELECT") input.value = d ?? input.value;
      else input.value = d === undefined || d === null ? "" : String(d);
      if (d === undefined || d === null) input.placeholder = key === "seed" ? "random" : "";
      this.inputs[key] = input;
      box.append(h("label", { class: "field", dataset: { key } }, h("span", {}, label), input,
                   h("small", { class: "err", dataset: { for: key } })));
    };
    const text = (mode) => h("input", { type: "text", autocomplete: "off", inputmode: mode });
    field("seed", "Seed", main, text("numeric"));
    field("steps", "Steps", main, text("numeric"));
    field("sampler", "Sampler", main, h("select", {}, samplers.map((s) => h("option", { value: s.key }, s.label))));
    field("negative_prompt", "Negative prompt", more, h("input", { type: "text", autocomplete: "off" }));
    field("width", "Width", more, text("numeric"));
    field("height", "Height", more, text("numeric"));
    field("cfg", "CFG scale", more, text("decimal"));
    field("batch", "Images", more, text("numeric"));
  }

  /** Append text to the prompt (an embedding's trigger, a hypernetwork tag). */
  use(text) {
    const prompt = $("#g-prompt");
    prompt.value = prompt.value.trim() ? `${prompt.value.trim()} ${text}` : text;
    prompt.focus();
  }

  body() {
    const out = { prompt: $("#g-prompt").value };
    for (const [key, input] of Object.entries(this.inputs)) {
      const v = input.value.trim();
      if (v === "") continue;
      out[key] = key === "negative_prompt" || key === "sampler" ? input.value
        : (/^[+-]?\d+(\.\d+)?(e[+-]?\d+)?$/i.test(v) ? Number(v) : v);
    }
    return out;
  }

  async run() {
    const err = $("#gen-err"), status = $("#gen-status"), btn = $("#gen-btn");
    clearErrors(this.form, err);
    btn.disabled = true;
    status.textContent = "generating (between training steps)…";
    try {
      const res = await api("/api/v1/txt2img", { json: this.body() });
      status.textContent = "";
      const box = $("#gen-results");
      for (const img of res.images.slice().reverse()) {
        box.insertBefore(h("figure", { class: "result", dataset: { seed: img.seed } },
          h("a", { href: img.url, target: "_blank", rel: "noopener" }, h("img", { src: img.url, alt: `seed ${img.seed}` })),
          h("figcaption", {}, h("a", { href: img.url, download: img.file }, img.file)),
          h("pre", { class: "infotext" }, img.infotext)), box.firstChild);
      }
      while (box.children.length > KEEP_RESULTS) box.lastChild.remove();
    } catch (e) {
      status.textContent = "";
      showError(this.form, err, e);
    } finally {
      btn.disabled = false;
    }
  }
}
