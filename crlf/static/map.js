// crlf's embedding map: points on a canvas, coloured by label, with hover / click callbacks, zoom (wheel) and pan
// (drag). Shared by `crlf explore`'s page and the static map of `crlf visualize --run` (inlined there).
// crlfMap(canvas, {x, y, labels}, {onHover(i, clientX, clientY), onClick(i)}) -> {draw, highlight, select, ...}
"use strict";

const CRLF_TAB10 = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
  "#bcbd22", "#17becf"];
const CRLF_TAB20 = ["#1f77b4", "#aec7e8", "#ff7f0e", "#ffbb78", "#2ca02c", "#98df8a", "#d62728", "#ff9896",
  "#9467bd", "#c5b0d5", "#8c564b", "#c49c94", "#e377c2", "#f7b6d2", "#7f7f7f", "#c7c7c7", "#bcbd22", "#dbdb8d",
  "#17becf", "#9edae5"];

function crlfColour(label, classes) {
  if (label === null || label === undefined) return "#555555";
  if (classes <= 10) return CRLF_TAB10[label % 10];
  if (classes <= 20) return CRLF_TAB20[label % 20];
  return "hsl(" + ((label * 137.508) % 360).toFixed(1) + ", 65%, 48%)";  // golden-angle hues
}

function crlfMap(canvas, pts, opts) {
  const n = pts.x.length;
  const labels = pts.labels;
  const classes = Math.max(opts.classes || 0, labels ? labels.reduce((m, v) => Math.max(m, v), 0) + 1 : 0);
  const ctx = canvas.getContext("2d");
  const radius = n > 20000 ? 1.5 : n > 5000 ? 2 : n > 500 ? 3 : 4;
  const view = {scale: 1, dx: 0, dy: 0};  // zoom and pan on top of the fit
  let sx = new Float32Array(n), sy = new Float32Array(n);  // screen positions in CSS pixels
  let grid = null;  // 8-px cells -> point indices, for hit tests; rebuilt on the first pick after a change
  const palette = Array.from({length: Math.max(classes, 1)}, (_, c) => crlfColour(c, classes));
  const colourOf = (i) => (labels ? palette[labels[i]] || crlfColour(labels[i], classes) : "#555555");
  let highlighted = null, selected = -1, drawn = 0;
  // draw order: grouped by colour (fewer fillStyle changes)
  const order = Array.from({length: n}, (_, i) => i);
  if (labels) order.sort((a, b) => labels[a] - labels[b]);

  function layout() {
    const w = canvas.clientWidth, h = canvas.clientHeight, dpr = window.devicePixelRatio || 1;
    if (canvas.width !== Math.round(w * dpr) || canvas.height !== Math.round(h * dpr)) {
      canvas.width = Math.round(w * dpr);
      canvas.height = Math.round(h * dpr);
    }
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    const side = Math.min(w, h) - 24;  // data lies in [0, 1]^2, aspect kept
    const ox = (w - side) / 2, oy = (h - side) / 2;
    for (let i = 0; i < n; i++) {
      sx[i] = (ox + pts.x[i] * side - w / 2) * view.scale + w / 2 + view.dx;
      sy[i] = (oy + (1 - pts.y[i]) * side - h / 2) * view.scale + h / 2 + view.dy;
    }
    grid = null;
  }

  function buildGrid() {
    grid = new Map();
    for (let i = 0; i < n; i++) {
      const key = Math.floor(sx[i] / 8) * 65536 + Math.floor(sy[i] / 8);  // numbers: faster keys than strings
      const cell = grid.get(key);
      if (cell) cell.push(i); else grid.set(key, [i]);
    }
  }

  function draw() {
    layout();
    const w = canvas.clientWidth, h = canvas.clientHeight;
    ctx.clearRect(0, 0, w, h);
    ctx.fillStyle = "#ffffff";
    ctx.fillRect(0, 0, w, h);
    ctx.globalAlpha = highlighted ? 0.18 : 0.85;
    let colour = null;
    drawn = 0;
    for (const i of order) {
      const c = colourOf(i);
      if (c !== colour) { ctx.fillStyle = c; colour = c; }
      ctx.fillRect(sx[i] - radius, sy[i] - radius, 2 * radius, 2 * radius);
      drawn++;
    }
    ctx.globalAlpha = 1;
    if (highlighted) {
      ctx.strokeStyle = "#000000";
      for (const i of highlighted) {
        ctx.fillStyle = colourOf(i);
        ctx.fillRect(sx[i] - radius - 1, sy[i] - radius - 1, 2 * radius + 2, 2 * radius + 2);
        ctx.strokeRect(sx[i] - radius - 1, sy[i] - radius - 1, 2 * radius + 2, 2 * radius + 2);
      }
    }
    if (selected >= 0) {
      ctx.strokeStyle = "#000000";
      ctx.lineWidth = 2;
      ctx.beginPath();
      ctx.arc(sx[selected], sy[selected], radius + 6, 0, 2 * Math.PI);
      ctx.stroke();
      ctx.lineWidth = 1;
    }
    api.drawn = drawn;
  }

  function pick(px, py) {  // the nearest point within 8 px of (px, py) in CSS pixels, or -1
    let best = -1, bestD = 64;
    if (grid === null) buildGrid();
    const cx = Math.floor(px / 8), cy = Math.floor(py / 8);
    for (let gx = cx - 1; gx <= cx + 1; gx++) {
      for (let gy = cy - 1; gy <= cy + 1; gy++) {
        for (const i of grid.get(gx * 65536 + gy) || []) {
          const d = (sx[i] - px) ** 2 + (sy[i] - py) ** 2;
          if (d < bestD) { bestD = d; best = i; }
        }
      }
    }
    return best;
  }

  function local(e) {
    const r = canvas.getBoundingClientRect();
    return [e.clientX - r.left, e.clientY - r.top];
  }

  let drag = null;
  canvas.addEventListener("mousedown", (e) => { drag = {x: e.clientX, y: e.clientY, moved: false}; });
  window.addEventListener("mouseup", () => { setTimeout(() => { drag = null; }, 0); });
  canvas.addEventListener("mousemove", (e) => {
    if (drag && (e.buttons & 1)) {
      const mx = e.clientX - drag.x, my = e.clientY - drag.y;
      if (drag.moved || Math.abs(mx) + Math.abs(my) > 3) {
        drag.moved = true;
        view.dx += mx; view.dy += my;
        drag.x = e.clientX; drag.y = e.clientY;
        draw();
        return;
      }
    }
    const [px, py] = local(e);
    if (opts.onHover) opts.onHover(pick(px, py), e.clientX, e.clientY);
  });
  canvas.addEventListener("mouseleave", () => { if (opts.onHover) opts.onHover(-1, 0, 0); });
  canvas.addEventListener("click", (e) => {
    if (drag && drag.moved) return;
    const [px, py] = local(e);
    const i = pick(px, py);
    if (i >= 0 && opts.onClick) opts.onClick(i);
  });
  canvas.addEventListener("wheel", (e) => {
    e.preventDefault();
    const [px, py] = local(e);
    const w = canvas.clientWidth, h = canvas.clientHeight;
    const f = Math.exp(-e.deltaY * 0.0015);
    const scale = Math.min(200, Math.max(0.5, view.scale * f)), k = scale / view.scale;
    view.dx = (px - w / 2) - k * (px - w / 2 - view.dx);
    view.dy = (py - h / 2) - k * (py - h / 2 - view.dy);
    view.scale = scale;
    draw();
  }, {passive: false});
  canvas.addEventListener("dblclick", () => { view.scale = 1; view.dx = 0; view.dy = 0; draw(); });
  window.addEventListener("resize", () => draw());

  const api = {
    drawn: 0,
    count: n,
    classes: classes,
    colour: (label) => crlfColour(label, classes),
    draw: draw,
    highlight(indices) { highlighted = indices && indices.length ? indices : null; draw(); },
    select(i) { selected = i; draw(); },
    get selected() { return selected; },  // the ringed point, -1 for none
    screenPosition(i) {  // viewport coordinates of point i (tests click there)
      const r = canvas.getBoundingClientRect();
      return [r.left + sx[i], r.top + sy[i]];
    },
  };
  draw();
  return api;
}
