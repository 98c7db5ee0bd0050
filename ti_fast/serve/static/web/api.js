// The page's one way to the server: same-origin requests to /api/v1, errors as one line (with
// the `field` a refused setting names), and small DOM and number helpers shared by the others.

export class ApiError extends Error {
  constructor(status, message, field) {
    super(message);
    this.status = status;
    this.field = field || null;
  }
}

const listeners = { unauthorized: [] };

/** fn() runs whenever a request gets 401 (the page then asks for the token). */
export function onUnauthorized(fn) {
  listeners.unauthorized.push(fn);
}

function refusal(status, text, statusText) {
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch (e) { data = null; }
  let msg = data && (data.error || data.detail);
  if (typeof msg !== "string") msg = `${status} ${statusText || "error"}`;
  // a request's own field (FastAPI's "body.steps: ...") when the server names no setting
  const own = /^body\.(?:config\.)?([a-z_][a-z0-9_]*)\b/.exec(msg);
  const err = new ApiError(status, msg, (data && data.field) || (own && own[1]));
  if (status === 401) listeners.unauthorized.forEach((fn) => fn(err));
  return err;
}

/** JSON in, JSON out. opts: {method, json, body}. Throws ApiError with the server's one line. */
export async function api(path, opts = {}) {
  const init = { method: opts.method || (opts.json !== undefined || opts.body ? "POST" : "GET"),
                 headers: { Accept: "application/json" }, credentials: "same-origin", cache: "no-store" };
  if (opts.json !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(opts.json);
  } else if (opts.body) {
    init.body = opts.body;
  }
  let r;
  try {
    r = await fetch(path, init);
  } catch (e) {
    throw new ApiError(0, `the server did not answer (${e.message})`);
  }
  const text = await r.text();
  if (!r.ok) throw refusal(r.status, text, r.statusText);
  try { return text ? JSON.parse(text) : null; } catch (e) { return text; }
}

/** POST a FormData with upload progress (fetch reports none): onProgress(fraction). */
export function upload(path, form, onProgress) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", path);
    xhr.responseType = "text";
    xhr.upload.onprogress = (e) => { if (e.lengthComputable && onProgress) onProgress(e.loaded / e.total); };
    xhr.onload = () => {
      if (xhr.status >= 200 && xhr.status < 300) {
        try { resolve(JSON.parse(xhr.responseText)); } catch (e) { resolve(null); }
      } else {
        reject(refusal(xhr.status, xhr.responseText, xhr.statusText));
      }
    };
    xhr.onerror = () => reject(new ApiError(0, "the upload did not reach the server"));
    xhr.send(form);
  });
}

/** h("div", {class: "x", onclick: fn}, "text", child...): an element; text always as text. */
export function h(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on") && typeof v === "function") e.addEventListener(k.slice(2), v);
    else if (k === "dataset") Object.assign(e.dataset, v);
    else e.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

export const $ = (sel, root = document) => root.querySelector(sel);
export const $$ = (sel, root = document) => Array.from(root.querySelectorAll(sel));

/** 3725 -> "1:02:05", 75 -> "1:15". */
export function duration(s) {
  if (s === null || s === undefined || !isFinite(s)) return "–";
  s = Math.max(0, Math.round(s));
  const hh = Math.floor(s / 3600), mm = Math.floor((s % 3600) / 60), ss = s % 60;
  const two = (n) => String(n).padStart(2, "0");
  return hh ? `${hh}:${two(mm)}:${two(ss)}` : `${mm}:${two(ss)}`;
}

/** A number for people: 4 significant digits, exponent form for the very small (learning rates). */
export function num(v, digits = 4) {
  if (v === null || v === undefined || v === "") return "–";
  const x = Number(v);
  if (!isFinite(x)) return String(v);
  if (x !== 0 && (Math.abs(x) < 1e-3 || Math.abs(x) >= 1e6)) return x.toExponential(2);
  return String(Number(x.toPrecision(digits)));
}

/** count(1, "image") -> "1 image", count(3, "image") -> "3 images". */
export function count(n, word) {
  return `${n} ${word}${n === 1 ? "" : "s"}`;
}

export function bytes(n) {
  if (n === null || n === undefined) return "";
  const units = ["B", "KB", "MB", "GB"];
  let i = 0;
  for (; n >= 1024 && i < units.length - 1; i++) n /= 1024;
  return `${i ? n.toFixed(1) : n} ${units[i]}`;
}

/** Show the server's line beside the field it names (inside `form`), else in `general`. */
export function showError(form, general, err) {
  const box = err.field && form && form.querySelector(`.err[data-for="${CSS.escape(err.field)}"]`);
  const target = box || general;
  if (target) target.textContent = err.message;
  const field = box && box.closest(".field");
  if (field) {
    field.classList.add("bad");
    const details = field.closest("details");
    if (details) details.open = true;
    const input = field.querySelector("input, select, textarea");
    if (input) input.focus();
  }
  return target;
}

export function clearErrors(form, general) {
  if (form) {
    for (const e of form.querySelectorAll(".err")) e.textContent = "";
    for (const f of form.querySelectorAll(".field.bad")) f.classList.remove("bad");
  }
  if (general) general.textContent = "";
}
