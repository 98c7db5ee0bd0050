// The API page: renders /openapi.json as a list of routes (no framework, no CDN).
"use strict";

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return e;
}

function resolve(spec, schema) {
  let s = schema || {};
  for (let i = 0; s.$ref && i < 10; i++) s = spec.components.schemas[s.$ref.split("/").pop()] || {};
  return s;
}

function typeOf(spec, schema) {
  const s = resolve(spec, schema);
  if (s.anyOf) return s.anyOf.map(x => typeOf(spec, x)).join(" | ");
  if (s.type === "array") return typeOf(spec, s.items) + "[]";
  return s.type || (s.title || "any");
}

function fieldsTable(spec, schema) {
  const s = resolve(spec, schema);
  if (!s.properties) return el("p", {}, "JSON: ", el("code", {}, typeOf(spec, schema)));
  const t = el("table", {}, el("tr", {}, el("th", {}, "field"), el("th", {}, "type"), el("th", {}, "default"),
                                el("th", {}, "meaning")));
  for (const [name, p] of Object.entries(s.properties)) {
    const d = "default" in p ? JSON.stringify(p.default) : ((s.required || []).includes(name) ? "required" : "");
    t.append(el("tr", {}, el("td", {}, el("code", {}, name)), el("td", {}, typeOf(spec, p)), el("td", {}, d),
                el("td", {}, p.description || "")));
  }
  return t;
}

function route(spec, path, method, op) {
  const body = el("div", {class: "body"});
  if (op.description) body.append(el("p", {}, op.description));
  const params = (op.parameters || []);
  if (params.length) {
    const t = el("table", {}, el("tr", {}, el("th", {}, "parameter"), el("th", {}, "in"), el("th", {}, "type")));
    for (const p of params) t.append(el("tr", {}, el("td", {}, el("code", {}, p.name)), el("td", {}, p.in),
                                          el("td", {}, typeOf(spec, p.schema))));
    body.append(t);
  }
  const content = op.requestBody && op.requestBody.content || {};
  for (const [type, c] of Object.entries(content)) {
    body.append(el("p", {}, "Request body (", el("code", {}, type), "):"), fieldsTable(spec, c.schema));
  }
  const codes = Object.keys(op.responses || {}).join(", ");
  body.append(el("p", {}, "Responses: " + codes + ". Errors are JSON: ", el("code", {}, '{"error": "...", "detail": "..."}')));
  return el("details", {"data-key": (method + " " + path + " " + (op.summary || "")).toLowerCase()},
            el("summary", {}, el("span", {class: "method " + method}, method.toUpperCase()), " ",
               el("code", {}, path), " ", op.summary || ""), body);
}

async function main() {
  const main = document.getElementById("routes");
  const res = await fetch("/openapi.json", {credentials: "same-origin"});
  if (!res.ok) { main.textContent = "Could not load /openapi.json: HTTP " + res.status; return; }
  const spec = await res.json();
  document.getElementById("version").textContent = spec.info.version;
  main.textContent = "";
  const groups = {};
  for (const [path, ops] of Object.entries(spec.paths)) {
    const g = path.startsWith("/sdapi/") ? "A1111-compatible (/sdapi/v1)" :
              path.startsWith("/api/v1/jobs") ? "Training jobs (/api/v1/jobs)" : "Library, txt2img, server (/api/v1)";
    for (const [method, op] of Object.entries(ops)) (groups[g] = groups[g] || []).push(route(spec, path, method, op));
  }
  for (const [g, items] of Object.entries(groups)) main.append(el("h2", {}, g), ...items);
  document.getElementById("filter").addEventListener("input", e => {
    const q = e.target.value.toLowerCase();
    for (const d of main.querySelectorAll("details")) d.hidden = q && !d.dataset.key.includes(q);
  });
}

main();
