// The loss chart: the raw loss, its smoothed curve and the learning rate on a second (right)
// axis, drawn on a <canvas> without any library. Empty axes show from the start; a redraw is
// asked for freely and happens at most once a frame. With more points than pixel columns the
// raw loss is drawn as each column's min-max range, so a 100k-step run draws as fast as a short one.

const DEFAULT_COLORS = { raw: "#9db4d8", smooth: "#1f5fbf", lr: "#d9822b", axis: "#888", grid: "#e5e5e5", text: "#555" };

/** Nice tick values covering [lo, hi]: about n of them, on 1/2/5 x 10^k. */
export function niceTicks(lo, hi, n = 5) {
  if (!(hi > lo)) hi = lo + 1;
  const raw = (hi - lo) / Math.max(1, n);
  const mag = Math.pow(10, Math.floor(Math.log10(raw)));
  const step = [1, 2, 5, 10].map((m) => m * mag).find((s) => s >= raw) || 10 * mag;
  const first = Math.ceil(lo / step - 1e-9) * step;
  const out = [];
  for (let v = first; v <= hi + step * 1e-9; v += step) out.push(Number(v.toPrecision(12)));
  return out;
}

/** Debiased exponential moving average (as TensorBoard's smoothing): weight w in [0, 1). */
export function smooth(values, w) {
  const out = new Float64Array(values.length);
  let acc = 0, wpow = 1;
  for (let i = 0; i < values.length; i++) {
    acc = acc * w + (1 - w) * values[i];
    wpow *= w;
    out[i] = w > 0 ? acc / (1 - wpow) : values[i];
  }
  return out;
}

function label(v) {
  if (v === 0) return "0";
  const a = Math.abs(v);
  if (a < 1e-3 || a >= 1e5) return v.toExponential(1);
  return String(Number(v.toPrecision(3)));
}

export class LossChart {
  /** canvas: the element to draw on; mini: a small chart without axes labels (a job's card). */
  constructor(canvas, { mini = false } = {}) {
    this.canvas = canvas;
    this.mini = mini;
    this.points = [];          // [{step, loss, lr}], by step
    this.smoothing = 0.9;
    this.empty = "no loss yet: start a job, or pick one below";
    this.queued = false;
    if (window.ResizeObserver) new ResizeObserver(() => this.draw()).observe(canvas);
    this.draw();
  }

  /** points: [{step, loss, lr}] in step order (loss or lr may be null). */
  set(points) {
    this.points = points;
    this.draw();
  }

  setSmoothing(w) {
    this.smoothing = Math.min(0.999, Math.max(0, Number(w) || 0));
    this.draw();
  }

  draw() {
    if (this.queued) return;
    this.queued = true;
    requestAnimationFrame(() => {
      this.queued = false;
      this.render();
    });
  }

  colors() {
    const style = getComputedStyle(this.canvas);
    const out = {};
    for (const [k, v] of Object.entries(DEFAULT_COLORS)) out[k] = style.getPropertyValue(`--chart-${k}`).trim() || v;
    return out;
  }

  render() {
    const c = this.canvas, dpr = window.devicePixelRatio || 1;
    const W = c.clientWidth || 300, H = c.clientHeight || 150;
    if (c.width !== Math.round(W * dpr) || c.height !== Math.round(H * dpr)) {
      c.width = Math.round(W * dpr);
      c.height = Math.round(H * dpr);
    }
    const ctx = c.getContext("2d");
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, W, H);
    const col = this.colors();
    const m = this.mini ? { l: 3, r: 3, t: 3, b: 3 } : { l: 50, r: 56, t: 12, b: 26 };
    const pw = Math.max(10, W - m.l - m.r), ph = Math.max(10, H - m.t - m.b);
    const pts = this.points.filter((p) => p.loss !== null && p.loss !== undefined && isFinite(p.loss));
    const lrs = this.points.filter((p) => p.lr !== null && p.lr !== undefined && isFinite(p.lr));
    c.dataset.points = String(pts.length);
    c.dataset.lastStep = pts.length ? String(pts[pts.length - 1].step) : "";

    // ranges
    const all = pts.length ? pts : lrs;
    let x0 = all.length ? all[0].step : 0, x1 = all.length ? all[all.length - 1].step : 100;
    if (x1 <= x0) x1 = x0 + 1;
    let y0 = 0, y1 = 1;
    if (pts.length) {
      y0 = Infinity; y1 = -Infinity;
      for (const p of pts) { if (p.loss < y0) y0 = p.loss; if (p.loss > y1) y1 = p.loss; }
      const pad = (y1 - y0) * 0.06 || Math.abs(y1) * 0.1 || 0.5;
      y0 -= pad; y1 += pad;
    }
    const yt = niceTicks(y0, y1, this.mini ? 3 : 5);
    let lrMax = 0;
    for (const p of lrs) if (p.lr > lrMax) lrMax = p.lr;
    lrMax = lrMax > 0 ? lrMax * 1.1 : 0.01;
    const X = (s) => m.l + ((s - x0) / (x1 - x0)) * pw;
    const Y = (v) => m.t + ph - ((v - y0) / (y1 - y0)) * ph;
    const YL = (v) => m.t + ph - (v / lrMax) * ph;

    // frame, grid and labels
    ctx.lineWidth = 1;
    ctx.font = "11px system-ui, sans-serif";
    if (!this.mini) {
      ctx.strokeStyle = col.grid;
      ctx.fillStyle = col.text;
      ctx.textAlign = "right";
      ctx.textBaseline = "middle";
      for (const v of yt) {
        const y = Math.round(Y(v)) + 0.5;
        if (y < m.t - 1 || y > m.t + ph + 1) continue;
        ctx.beginPath(); ctx.moveTo(m.l, y); ctx.lineTo(m.l + pw, y); ctx.stroke();
        ctx.fillText(label(v), m.l - 5, y);
      }
      ctx.textAlign = "left";
      ctx.fillStyle = col.lr;
      for (const v of niceTicks(0, lrMax, 4)) {
        const y = YL(v);
        if (y >= m.t - 1) ctx.fillText(label(v), m.l + pw + 5, y);
      }
      ctx.textAlign = "center";
      ctx.textBaseline = "top";
      ctx.fillStyle = col.text;
      for (const s of niceTicks(x0, x1, Math.max(2, Math.floor(pw / 80)))) {
        if (s < x0 || s > x1 || (s !== Math.round(s))) continue;
        const x = Math.round(X(s)) + 0.5;
        ctx.strokeStyle = col.grid;
        ctx.beginPath(); ctx.moveTo(x, m.t); ctx.lineTo(x, m.t + ph); ctx.stroke();
        ctx.fillText(String(s), x, m.t + ph + 5);
      }
      ctx.strokeStyle = col.axis;
      ctx.strokeRect(m.l + 0.5, m.t + 0.5, pw, ph);
      ctx.textAlign = "left";
      ctx.textBaseline = "bottom";
    }
    if (!pts.length && !lrs.length) {
      if (!this.mini) {
        ctx.fillStyle = col.text;
        ctx.textAlign = "center";
        ctx.textBaseline = "middle";
        ctx.fillText(this.empty, m.l + pw / 2, m.t + ph / 2);
      }
      return;
    }
    ctx.save();
    ctx.beginPath();
    ctx.rect(m.l, m.t, pw, ph);
    ctx.clip();

    // raw loss: a line, or each pixel column's min..max once points outnumber the columns
    ctx.strokeStyle = col.raw;
    ctx.lineWidth = 1;
    ctx.beginPath();
    if (pts.length <= pw) {
      pts.forEach((p, i) => (i ? ctx.lineTo(X(p.step), Y(p.loss)) : ctx.moveTo(X(p.step), Y(p.loss))));
    } else {
      const lo = new Float64Array(Math.ceil(pw) + 1).fill(Infinity), hi = new Float64Array(lo.length).fill(-Infinity);
      for (const p of pts) {
        const i = Math.min(lo.length - 1, Math.max(0, Math.floor(X(p.step) - m.l)));
        if (p.loss < lo[i]) lo[i] = p.loss;
        if (p.loss > hi[i]) hi[i] = p.loss;
      }
      for (let i = 0; i < lo.length; i++) {
        if (lo[i] === Infinity) continue;
        ctx.moveTo(m.l + i + 0.5, Y(lo[i]));
        ctx.lineTo(m.l + i + 0.5, Y(hi[i]) - 0.5);
      }
    }
    ctx.stroke();

    if (pts.length === 1) {                  // one point draws no line: a dot
      ctx.fillStyle = col.smooth;
      ctx.beginPath();
      ctx.arc(X(pts[0].step), Y(pts[0].loss), 3, 0, 2 * Math.PI);
      ctx.fill();
    }

    // smoothed loss: one vertex per pixel column at most
    const s = smooth(pts.map((p) => p.loss), this.smoothing);
    ctx.strokeStyle = col.smooth;
    ctx.lineWidth = this.mini ? 1.5 : 2;
    ctx.beginPath();
    let lastCol = -1;
    pts.forEach((p, i) => {
      const x = X(p.step), colIdx = Math.floor(x);
      if (colIdx === lastCol && i !== pts.length - 1) return;
      lastCol = colIdx;
      if (i === 0) ctx.moveTo(x, Y(s[i])); else ctx.lineTo(x, Y(s[i]));
    });
    ctx.stroke();

    // learning rate: a step line on its own axis, a vertex only where it changes
    if (lrs.length) {
      ctx.strokeStyle = col.lr;
      ctx.lineWidth = 1.25;
      ctx.setLineDash(this.mini ? [] : [4, 3]);
      ctx.beginPath();
      let prev = lrs[0].lr;
      ctx.moveTo(X(lrs[0].step), YL(prev));
      for (let i = 1; i < lrs.length; i++) {
        const p = lrs[i];
        if (p.lr !== prev) {
          ctx.lineTo(X(p.step), YL(prev));
          ctx.lineTo(X(p.step), YL(p.lr));
          prev = p.lr;
        }
      }
      ctx.lineTo(X(lrs[lrs.length - 1].step), YL(prev));
      ctx.stroke();
      ctx.setLineDash([]);
    }
    ctx.restore();
  }
}
