// protoserve explorer: browse a model's components and fit reports, explain an input, switch components off.
// It calls the server it came from: protoserve.v1's rpcs in protobuf's JSON mapping
// (POST /protoserve.v1.Explainer/{rpc}) and the Open Inference Protocol's health endpoint.
// Every string from the server or a file is shown as text (textContent), never parsed as HTML.
"use strict";

const TOKEN_KEY = "protoserve-token";
const TOP_CLASSES = 5;
const WATERFALL_MAX_BARS = 14;
const REPORT_MAX_ROWS = 40;

const state = {
  token: sessionStorage.getItem(TOKEN_KEY) || "",
  info: null,           // ModelInfo (GetModel)
  method: "",
  input: null,          // {tensor: {dtype, shape, data}} or {image: base64}, plus what to draw
  explanation: null,    // ExplainResponse without interventions
  intervened: null,     // ExplainResponse with the suppressed components' intervention
  suppressed: new Set(),
  heatmap: "",          // component id, "sum", or "none"
  requests: 0,          // the latest explanation asked for (older answers are dropped)
};

// ------------------------------------------------------------------------- DOM helpers

const $ = (id) => document.getElementById(id);

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (key === "class") node.className = value;
    else if (key === "dataset") Object.assign(node.dataset, value);
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined) node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

const SVG_NS = "http://www.w3.org/2000/svg";
function svg(tag, attrs = {}, text) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
  if (text !== undefined) node.textContent = text;
  return node;
}

function clear(node) { node.replaceChildren(); return node; }

const fixed = (x, digits = 4) => Number(x).toFixed(digits);
const signed = (x, digits = 4) => (x < 0 ? "−" : "+") + Math.abs(x).toFixed(digits);

function showError(message) {
  const banner = $("banner");
  banner.textContent = message;
  banner.hidden = !message;
}

// ------------------------------------------------------------------------- tensors

function floatsFromBase64(data) {
  const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
  const view = new DataView(bytes.buffer);
  const out = new Float32Array(bytes.length / 4);
  for (let i = 0; i < out.length; i++) out[i] = view.getFloat32(4 * i, true);
  return out;
}

function base64FromFloats(values) {
  const view = new DataView(new ArrayBuffer(values.length * 4));
  values.forEach((v, i) => view.setFloat32(4 * i, v, true));
  return base64FromBytes(new Uint8Array(view.buffer));
}

function base64FromBytes(bytes) {
  let text = "";
  for (let i = 0; i < bytes.length; i += 0x8000) text += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  return btoa(text);
}

const shapeOf = (tensor) => tensor.shape.map(Number);

// ------------------------------------------------------------------------- the server

async function rpc(name, body) {
  for (;;) {
    const headers = {"Content-Type": "application/json"};
    if (state.token) headers.Authorization = `Bearer ${state.token}`;
    const response = await fetch(`/protoserve.v1.Explainer/${name}`, {method: "POST", headers, body: JSON.stringify(body)});
    if (response.status === 401) {
      await askToken();
      continue;
    }
    const answer = await response.json().catch(() => ({error: `${response.status} ${response.statusText}`}));
    if (!response.ok) throw new Error(answer.error || `${response.status} ${response.statusText}`);
    return answer;
  }
}

function askToken() {
  return new Promise((resolve) => {
    const dialog = $("token-dialog");
    dialog.addEventListener("close", () => {
      state.token = $("token-input").value.trim();
      sessionStorage.setItem(TOKEN_KEY, state.token);
      resolve();
    }, {once: true});
    dialog.showModal();
  });
}

async function checkReady() {
  const status = $("server-status");
  try {
    const response = await fetch("/v2/health/ready");
    status.textContent = response.ok ? "ready" : "not ready";
    status.className = `status ${response.ok ? "ok" : "bad"}`;
  } catch (error) {
    status.textContent = "unreachable";
    status.className = "status bad";
  }
}

// ------------------------------------------------------------------------- models and methods

async function loadModels() {
  const {models} = await rpc("ListModels", {});
  const select = clear($("model-select"));
  for (const model of models) {
    select.append(el("option", {value: `${model.name}\u0000${model.version}`}, `${model.name} v${model.version}`));
  }
  if (!models.length) {
    showError("The server has no models: put archives in its model store (make demo builds the demo ones).");
    return;
  }
  // #NAME in the address picks a model (e.g. /#mnist); else the first.
  const wanted = decodeURIComponent(location.hash.slice(1));
  const model = models.find((m) => m.name === wanted) || models[0];
  select.value = `${model.name}\u0000${model.version}`;
  await selectModel(model.name, model.version);
}

async function selectModel(name, version) {
  const info = await rpc("GetModel", {model: name, version});
  state.info = info;
  state.input = null;
  state.explanation = state.intervened = null;
  state.suppressed.clear();
  renderSamples();
  $("drop-hint").textContent = info.image_mode
    ? "a .png / .jpg image (read as " + info.image_mode + "), or a .csv of numbers — or click to choose"
    : `a .csv of ${info.input_shape.map(Number).reduce((a, b) => a * b, 1)} numbers — or click to choose`;
  await selectMethod(info.default_method);
  if (info.samples.length) await pickSample(0);
  else renderExplanation();
}

function methodInfo() { return state.info.methods.find((m) => m.name === state.method); }

function componentInfo(id) {
  return methodInfo().components.find((c) => c.id === id) || {id, label: id, class_index: -1};
}

function classLabel(index) { return index < 0 ? "shared" : state.info.labels[index]; }

async function selectMethod(name) {
  state.method = name;
  newInput();
  const tabs = clear($("method-tabs"));
  for (const method of state.info.methods) {
    tabs.append(el("button", {
      type: "button", class: `tab${method.name === name ? " active" : ""}`, dataset: {method: method.name},
      onclick: () => selectMethod(method.name).catch((e) => showError(e.message)),
    }, method.name, method.additive ? el("span", {class: "tag"}, "additive") : null));
  }
  const method = methodInfo();
  $("method-definition").textContent = [method.contribution_definition, method.residual_share_definition]
    .filter(Boolean).join(" · ");
  renderGalleryClasses();
  renderGallery();
  renderReport(method);
  if (state.input) await explain();
}

// ------------------------------------------------------------------------- inputs

function isImage(shape) { return shape.length === 3 && shape[1] > 1 && shape[2] > 1; }

function renderSamples() {
  const box = clear($("samples"));
  const shape = state.info.input_shape.map(Number);
  state.info.samples.forEach((sample, i) => {
    const values = floatsFromBase64(sample.input.data);
    const thumb = isImage(shape) ? imageCanvas(values, shape, 2) : seriesThumb(values);
    box.append(el("button", {
      type: "button", class: "sample", title: `sample ${i}: ${sample.label}`, dataset: {sample: String(i)},
      onclick: () => pickSample(i).catch((e) => showError(e.message)),
    }, thumb, el("span", {}, sample.label)));
  });
  if (!state.info.samples.length) box.append(el("p", {class: "muted"}, "This archive carries no held-out samples."));
}

async function pickSample(index) {
  const sample = state.info.samples[index];
  document.querySelectorAll(".sample").forEach((b) => b.classList.toggle("active", b.dataset.sample === String(index)));
  state.input = {tensor: sample.input, values: floatsFromBase64(sample.input.data), shape: shapeOf(sample.input),
                 caption: `held-out sample ${index} · true class ${sample.label}`};
  newInput();
  await explain();
}

async function dropFile(file) {
  const shape = state.info.input_shape.map(Number);
  document.querySelectorAll(".sample").forEach((b) => b.classList.remove("active"));
  if (/\.(png|jpe?g)$/i.test(file.name)) {
    if (!state.info.image_mode) throw new Error(`${state.info.name} takes tensors, not images: drop a .csv of numbers`);
    const bytes = new Uint8Array(await file.arrayBuffer());
    const picture = await loadPicture(file);
    state.input = {image: base64FromBytes(bytes), picture, shape, caption: `${file.name} (${bytes.length} bytes)`};
  } else {
    const numbers = (await file.text()).split(/[\s,;]+/).filter(Boolean).map(Number);
    const size = shape.reduce((a, b) => a * b, 1);
    if (numbers.some((n) => !Number.isFinite(n))) throw new Error(`${file.name}: not a list of numbers`);
    if (numbers.length !== size) throw new Error(`${file.name} has ${numbers.length} numbers; the model takes ${size} (shape [${shape}])`);
    const values = Float32Array.from(numbers);
    state.input = {tensor: {dtype: "float32", shape, data: base64FromFloats(values)}, values, shape,
                   caption: `${file.name} (${numbers.length} values)`};
  }
  newInput();
  await explain();
}

// A new input starts with every component and the heatmap of its top component.
function newInput() {
  state.suppressed.clear();
  state.heatmap = "";
}

function loadPicture(file) {
  return new Promise((resolve, reject) => {
    const url = URL.createObjectURL(file);
    const picture = new Image();
    picture.onload = () => resolve(picture);
    picture.onerror = () => reject(new Error(`${file.name}: the browser cannot read this image`));
    picture.src = url;
  });
}

// ------------------------------------------------------------------------- explaining

function explainRequest(interventions) {
  const request = {model: state.info.name, version: state.info.version, method: state.method,
                   top_k: Math.min(state.info.labels.length, 1000), heatmaps: "HEATMAP_MODE_INPUT"};
  if (state.input.tensor) request.input = state.input.tensor;
  else request.image = state.input.image;
  if (interventions) request.interventions = [{suppress: [...state.suppressed]}];
  return request;
}

async function explain() {
  const ticket = ++state.requests;
  document.body.classList.add("busy");
  try {
    const wanted = state.suppressed.size > 0;
    const answer = await rpc("Explain", explainRequest(wanted));
    if (ticket !== state.requests) return;
    state.explanation = answer;
    state.intervened = wanted ? answer.interventions[0] : null;
    showError("");
    renderExplanation();
  } catch (error) {
    if (ticket === state.requests) showError(error.message);
  } finally {
    if (ticket === state.requests) document.body.classList.remove("busy");
  }
}

function toggleComponent(id) {
  if (!state.input) return;
  if (state.suppressed.has(id)) state.suppressed.delete(id);
  else state.suppressed.add(id);
  explain();
}

// ------------------------------------------------------------------------- rendering an explanation

function renderExplanation() {
  const answer = state.explanation;
  $("input-caption").textContent = state.input ? state.input.caption : "Pick a sample below, or drop a file.";
  if (!answer) {
    $("prediction-summary").textContent = "No input yet.";
    clear($("prediction"));
    clear($("chart"));
    clear($("components"));
    $("intervention").hidden = true;
    return;
  }
  for (const item of document.querySelectorAll(".gallery-item")) {
    item.classList.toggle("suppressed", state.suppressed.has(item.dataset.componentId));
  }
  renderPrediction(answer);
  renderIntervention(answer);
  renderChart(answer);
  renderComponents(answer);
  renderHeatmapChoices(answer);
  drawInput();
}

function scoresTable(table, scores, target) {
  clear(table);
  table.append(el("tr", {}, el("th", {}, "class"), el("th", {class: "bar-cell"}, "probability"),
                  el("th", {class: "num"}, "logit"), el("th", {class: "num"}, "p")));
  for (const score of scores.slice(0, TOP_CLASSES)) {
    const index = score.class_index;
    const bar = el("div", {class: "bar"});
    bar.style.width = `${Math.max(0.5, 100 * score.probability)}%`;
    table.append(el("tr", {dataset: {classIndex: String(index)}, class: index === target ? "target" : ""},
      el("td", {class: "label"}, score.label),
      el("td", {class: "bar-cell"}, el("div", {class: "track"}, bar)),
      el("td", {class: "num logit"}, fixed(score.logit)),
      el("td", {class: "num probability"}, fixed(score.probability))));
  }
}

function renderPrediction(answer) {
  const top = answer.prediction[0];
  const summary = clear($("prediction-summary"));
  summary.className = "summary";
  summary.append("Predicted ", el("strong", {id: "predicted-label"}, top.label),
                 " · explaining class ", el("strong", {id: "target-label"}, classLabel(answer.target_class)),
                 ", logit ", el("strong", {id: "target-logit"}, fixed(answer.target_logit)));
  scoresTable($("prediction"), answer.prediction, answer.target_class);
}

function renderIntervention(answer) {
  const box = $("intervention");
  box.hidden = !state.intervened;
  if (!state.intervened) return;
  const after = state.intervened;
  $("suppressed-count").textContent = `${state.suppressed.size} component${state.suppressed.size === 1 ? "" : "s"}`;
  const summary = clear($("intervention-summary"));
  const change = after.target_logit - answer.target_logit;
  summary.append("Target logit ", el("strong", {}, fixed(answer.target_logit)), " → ",
                 el("strong", {id: "intervened-target-logit"}, fixed(after.target_logit)),
                 el("span", {class: change < 0 ? "down" : "up"}, ` (${signed(change)})`),
                 " · now predicted ", el("strong", {id: "intervened-label"}, after.prediction[0].label));
  scoresTable($("intervened-prediction"), after.prediction, answer.target_class);
}

function chartScale(lo, hi, width) {
  const span = hi - lo || 1;
  return (v) => ((v - lo) / span) * width;
}

function renderChart(answer) {
  const method = methodInfo();
  const chart = clear($("chart"));
  const components = [...answer.components].sort((a, b) => Math.abs(b.contribution) - Math.abs(a.contribution));
  const additivity = $("additivity");
  additivity.hidden = false;
  if (method.additive) {
    $("decomposition-title").textContent = "Decomposition: bias + contributions + residual = logit";
    $("decomposition-note").textContent = `Each bar adds to the running total of class ${classLabel(answer.target_class)}'s logit; hatched bars are suppressed.`;
    additivity.textContent = `additivity gap ${Number(answer.additivity_gap).toExponential(1)}`;
    additivity.className = `pill ${answer.additive ? "ok" : "bad"}`;
    waterfall(chart, answer, components);
  } else {
    $("decomposition-title").textContent = "Components, ranked";
    $("decomposition-note").textContent = "This method is not additive: the bars rank the components; they do not sum to the logit.";
    additivity.textContent = "not additive";
    additivity.className = "pill";
    rankedBars(chart, components);
  }
}

function waterfall(chart, answer, components) {
  const shown = components.slice(0, WATERFALL_MAX_BARS);
  const rest = components.slice(WATERFALL_MAX_BARS);
  const steps = [{label: "bias", value: answer.bias, kind: "bias"}];
  for (const c of shown) steps.push({label: componentInfo(c.id).label || c.id, id: c.id, value: c.contribution, kind: "component"});
  if (rest.length) steps.push({label: `${rest.length} more components`, value: rest.reduce((s, c) => s + c.contribution, 0), kind: "rest"});
  steps.push({label: "residual", value: answer.residual_contribution, kind: "residual"});
  let total = 0;
  for (const step of steps) { step.from = total; total += step.value; step.to = total; }
  steps.push({label: "logit", from: 0, to: answer.target_logit, value: answer.target_logit, kind: "total"});
  const row = 26, left = 210, width = 520, right = 90;
  const values = steps.flatMap((s) => [s.from, s.to]).concat([0]);
  if (state.intervened) values.push(state.intervened.target_logit);
  const lo = Math.min(...values), hi = Math.max(...values);
  const x = chartScale(lo, hi, width);
  const height = row * steps.length + 34;
  chart.setAttribute("viewBox", `0 0 ${left + width + right} ${height}`);
  chart.append(svg("line", {x1: left + x(0), x2: left + x(0), y1: 4, y2: height - 22, class: "axis"}));
  steps.forEach((step, i) => {
    const y = 8 + i * row;
    const a = left + x(Math.min(step.from, step.to)), b = left + x(Math.max(step.from, step.to));
    const suppressed = step.id && state.suppressed.has(step.id);
    const kind = step.kind === "total" ? "total" : step.value < 0 ? "neg" : "pos";
    const group = svg("g", {class: `step ${step.kind}${suppressed ? " suppressed" : ""}`, "data-step": step.id || step.kind});
    group.append(svg("text", {x: left - 8, y: y + 15, class: "step-label", "text-anchor": "end"}, truncate(step.label, 30)));
    group.append(svg("rect", {x: a, y, width: Math.max(1.5, b - a), height: row - 8, rx: 3, class: `bar-${kind}`}));
    group.append(svg("text", {x: b + 6, y: y + 14, class: "step-value"},
                     step.kind === "total" ? fixed(step.value) : signed(step.value)));
    if (i > 0 && step.kind !== "total") {
      group.append(svg("line", {x1: left + x(step.from), x2: left + x(step.from), y1: y - 8, y2: y, class: "connector"}));
    }
    if (step.id) group.addEventListener("click", () => toggleComponent(step.id));
    chart.append(group);
  });
  if (state.intervened) {
    const xi = left + x(state.intervened.target_logit);
    chart.append(svg("line", {x1: xi, x2: xi, y1: 4, y2: height - 22, class: "intervened-line"}));
    chart.append(svg("text", {x: xi, y: height - 6, class: "intervened-text", "text-anchor": "middle"},
                     `after suppression ${fixed(state.intervened.target_logit)}`));
  }
}

function rankedBars(chart, components) {
  const useWeights = components.every((c) => c.contribution === 0);
  const key = useWeights ? "weight" : "contribution";
  const active = components.filter((c) => c[key] !== 0 || state.suppressed.has(c.id));
  const ranked = active.sort((a, b) => Math.abs(b[key]) - Math.abs(a[key])).slice(0, 20);
  const hidden = components.length - ranked.length;
  $("decomposition-note").textContent += hidden ? ` ${hidden} components with ${key} 0 or beyond the top 20 are not drawn.` : "";
  const row = 24, left = 210, width = 520, right = 90;
  const values = ranked.map((c) => c[key]).concat([0]);
  const x = chartScale(Math.min(...values), Math.max(...values), width);
  const height = row * ranked.length + 16;
  chart.setAttribute("viewBox", `0 0 ${left + width + right} ${Math.max(height, 40)}`);
  chart.append(svg("line", {x1: left + x(0), x2: left + x(0), y1: 2, y2: height - 4, class: "axis"}));
  ranked.forEach((c, i) => {
    const y = 6 + i * row, v = c[key];
    const a = left + x(Math.min(0, v)), b = left + x(Math.max(0, v));
    const group = svg("g", {class: `step component${state.suppressed.has(c.id) ? " suppressed" : ""}`, "data-step": c.id});
    group.append(svg("text", {x: left - 8, y: y + 14, class: "step-label", "text-anchor": "end"}, truncate(componentInfo(c.id).label || c.id, 30)));
    group.append(svg("rect", {x: a, y, width: Math.max(1.5, b - a), height: row - 8, rx: 3, class: v < 0 ? "bar-neg" : "bar-pos"}));
    group.append(svg("text", {x: b + 6, y: y + 13, class: "step-value"}, `${key} ${useWeights ? fixed(v) : signed(v)}`));
    group.addEventListener("click", () => toggleComponent(c.id));
    chart.append(group);
  });
}

function truncate(text, n) { return text.length > n ? text.slice(0, n - 1) + "…" : text; }

function exemplar(id, size) {
  const png = componentInfo(id).exemplar_png;
  if (!png) return el("div", {class: "no-exemplar"}, "no exemplar");
  const picture = el("img", {src: `data:image/png;base64,${png}`, alt: `exemplar of ${id}`, class: `exemplar ${size}`});
  return picture;
}

function renderComponents(answer) {
  const box = clear($("components"));
  const components = [...answer.components].sort((a, b) => Math.abs(b.contribution) - Math.abs(a.contribution) || b.weight - a.weight);
  const inactive = components.filter((c) => c.weight === 0 && c.contribution === 0 && !state.suppressed.has(c.id));
  let more = box;
  if (inactive.length) {
    more = el("div", {class: "components"});
    more.hidden = true;
  }
  for (const c of components) {
    const info = componentInfo(c.id);
    (inactive.includes(c) ? more : box).append(el("button", {
      type: "button", class: `component${state.suppressed.has(c.id) ? " suppressed" : ""}`,
      dataset: {componentId: c.id}, title: state.suppressed.has(c.id) ? "click to restore" : "click to suppress",
      onclick: () => toggleComponent(c.id),
    }, exemplar(c.id, "small"),
    el("div", {class: "component-text"},
      el("div", {class: "component-label"}, info.label || c.id),
      el("div", {class: "muted small"}, `${c.id} · ${classLabel(c.class_index)}`),
      el("div", {class: "numbers"},
        el("span", {}, "w ", el("span", {class: "weight"}, fixed(c.weight))),
        el("span", {class: c.contribution < 0 ? "down" : "up"}, el("span", {class: "contribution"}, signed(c.contribution)))))));
  }
  if (more !== box) {
    box.append(el("button", {type: "button", class: "link residual-line", onclick: (event) => {
      more.hidden = !more.hidden;
      event.target.textContent = `${more.hidden ? "show" : "hide"} ${inactive.length} inactive components (weight and contribution 0)`;
    }}, `show ${inactive.length} inactive components (weight and contribution 0)`), more);
  }
  const residual = el("div", {class: "residual-line muted"},
    `bias ${signed(answer.bias)} · residual ${signed(answer.residual_contribution)} · residual share ${fixed(answer.residual_share)}`);
  residual.id = "residual";
  box.append(residual);
}

// ------------------------------------------------------------------------- heatmaps

function renderHeatmapChoices(answer) {
  const select = clear($("heatmap-select"));
  select.append(el("option", {value: "none"}, "none"));
  if (answer.heatmaps.length > 1) select.append(el("option", {value: "sum"}, "sum of all components"));
  const ranked = [...answer.components].sort((a, b) => Math.abs(b.contribution) - Math.abs(a.contribution) || b.weight - a.weight);
  for (const c of ranked) {
    if (answer.heatmaps.some((h) => h.component_id === c.id)) {
      select.append(el("option", {value: c.id}, `${c.id} · ${componentInfo(c.id).label || ""}`));
    }
  }
  const keep = [...select.options].some((o) => o.value === state.heatmap);
  state.heatmap = keep ? state.heatmap : (ranked.length && answer.heatmaps.length ? ranked[0].id : "none");
  select.value = state.heatmap;
}

function heatmapValues() {
  const answer = state.explanation;
  if (!answer || state.heatmap === "none") return null;
  const maps = answer.heatmaps.filter((h) => state.heatmap === "sum" || h.component_id === state.heatmap);
  if (!maps.length) return null;
  const total = floatsFromBase64(maps[0].map.data);
  for (const map of maps.slice(1)) floatsFromBase64(map.map.data).forEach((v, i) => { total[i] += v; });
  return {values: total, shape: shapeOf(maps[0].map)};
}

// A diverging scale centred on zero: blue (negative), white, red (positive); t in [-1, 1].
function diverging(t) {
  const s = Math.min(1, Math.abs(t));
  const [r, g, b] = t < 0 ? [59, 76, 192] : [180, 4, 38];
  return [Math.round(255 + (r - 255) * s), Math.round(255 + (g - 255) * s), Math.round(255 + (b - 255) * s)];
}

function imageCanvas(values, shape, scale) {
  const [channels, h, w] = shape;
  const canvas = el("canvas", {width: w * scale, height: h * scale, class: "thumb"});
  const small = document.createElement("canvas");
  small.width = w; small.height = h;
  const context = small.getContext("2d");
  const pixels = context.createImageData(w, h);
  const plane = h * w;
  const ranges = [];
  for (let c = 0; c < channels; c++) {
    let lo = Infinity, hi = -Infinity;
    for (let i = 0; i < plane; i++) { const v = values[c * plane + i]; lo = Math.min(lo, v); hi = Math.max(hi, v); }
    ranges.push([lo, hi - lo || 1]);
  }
  for (let i = 0; i < plane; i++) {
    for (let k = 0; k < 3; k++) {
      const c = channels === 3 ? k : 0;
      pixels.data[4 * i + k] = Math.round(255 * (values[c * plane + i] - ranges[c][0]) / ranges[c][1]);
    }
    pixels.data[4 * i + 3] = 255;
  }
  context.putImageData(pixels, 0, 0);
  const target = canvas.getContext("2d");
  target.imageSmoothingEnabled = false;
  target.drawImage(small, 0, 0, canvas.width, canvas.height);
  return canvas;
}

function seriesThumb(values) {
  const box = svg("svg", {viewBox: "0 0 100 40", class: "thumb series-thumb"});
  box.append(svg("path", {d: seriesPath(values, 100, 40, 3), class: "series-line"}));
  return box;
}

function seriesPath(values, width, height, pad) {
  let lo = Infinity, hi = -Infinity;
  for (const v of values) { lo = Math.min(lo, v); hi = Math.max(hi, v); }
  const span = hi - lo || 1;
  return Array.from(values, (v, i) => `${i ? "L" : "M"}${(pad + (i / Math.max(1, values.length - 1)) * (width - 2 * pad)).toFixed(2)},${(height - pad - ((v - lo) / span) * (height - 2 * pad)).toFixed(2)}`).join("");
}

function drawInput() {
  const canvas = $("input-canvas");
  const series = $("input-series");
  const input = state.input;
  const heat = heatmapValues();
  const opacity = Number($("heatmap-opacity").value) / 100;
  let extent = 0;
  if (heat) for (const v of heat.values) extent = Math.max(extent, Math.abs(v));
  renderLegend(heat ? extent : 0);
  if (!input) return;
  const shape = input.shape;
  if (isImage(shape) || input.picture) {
    canvas.hidden = false; series.hidden = true;
    const context = canvas.getContext("2d");
    context.imageSmoothingEnabled = false;
    context.clearRect(0, 0, canvas.width, canvas.height);
    const base = input.picture || imageCanvas(input.values, shape, 1);
    context.drawImage(base, 0, 0, canvas.width, canvas.height);
    if (heat && extent > 0) {
      const [h, w] = heat.shape.slice(-2);
      const layer = document.createElement("canvas");
      layer.width = w; layer.height = h;
      const layerContext = layer.getContext("2d");
      const pixels = layerContext.createImageData(w, h);
      heat.values.forEach((v, i) => {
        const [r, g, b] = diverging(v / extent);
        pixels.data.set([r, g, b, Math.round(255 * opacity * Math.min(1, Math.abs(v) / extent))], 4 * i);
      });
      layerContext.putImageData(pixels, 0, 0);
      context.imageSmoothingEnabled = true;
      context.drawImage(layer, 0, 0, canvas.width, canvas.height);
    }
    return;
  }
  canvas.hidden = true; series.hidden = false;
  clear(series);
  const width = 560, height = 220, pad = 12;
  const n = input.values.length;
  if (heat && extent > 0) {
    const step = (width - 2 * pad) / n;
    heat.values.forEach((v, i) => {
      const [r, g, b] = diverging(v / extent);
      const band = svg("rect", {x: pad + i * step - step / 2, y: 0, width: step + 0.5, height, fill: `rgb(${r},${g},${b})`,
                                "fill-opacity": (opacity * Math.min(1, Math.abs(v) / extent)).toFixed(3)});
      series.append(band);
    });
  }
  series.append(svg("path", {d: seriesPath(input.values, width, height, pad), class: "series-line main"}));
}

function renderLegend(extent) {
  const legend = $("legend");
  legend.hidden = !(extent > 0);
  if (!extent) return;
  const bar = $("legend-bar");
  const context = bar.getContext("2d");
  for (let x = 0; x < bar.width; x++) {
    const [r, g, b] = diverging((x / (bar.width - 1)) * 2 - 1);
    context.fillStyle = `rgb(${r},${g},${b})`;
    context.fillRect(x, 0, 1, bar.height);
  }
  $("legend-min").textContent = (-extent).toPrecision(3);
  $("legend-max").textContent = "+" + extent.toPrecision(3);
}

// ------------------------------------------------------------------------- gallery and fit report

function renderGalleryClasses() {
  const select = clear($("gallery-class"));
  const classes = [...new Set(methodInfo().components.map((c) => c.class_index))].sort((a, b) => a - b);
  select.append(el("option", {value: "all"}, `all (${methodInfo().components.length})`));
  for (const index of classes) select.append(el("option", {value: String(index)}, classLabel(index)));
}

function renderGallery() {
  const box = clear($("gallery"));
  const chosen = $("gallery-class").value;
  const components = methodInfo().components.filter((c) => chosen === "all" || String(c.class_index) === chosen);
  const byClass = new Map();
  for (const c of components) {
    if (!byClass.has(c.class_index)) byClass.set(c.class_index, []);
    byClass.get(c.class_index).push(c);
  }
  for (const [index, members] of [...byClass.entries()].sort((a, b) => a[0] - b[0])) {
    const row = el("div", {class: "gallery-row"});
    for (const c of members) {
      row.append(el("button", {
        type: "button", class: `gallery-item${state.suppressed.has(c.id) ? " suppressed" : ""}`, dataset: {componentId: c.id},
        title: `${c.id}: click to ${state.suppressed.has(c.id) ? "restore" : "suppress"} in the explanation`,
        onclick: () => toggleComponent(c.id),
      }, exemplar(c.id, "large"), el("div", {class: "gallery-label"}, c.label || c.id), el("div", {class: "muted small"}, c.id)));
    }
    box.append(el("section", {class: "gallery-class"}, el("h3", {}, `class ${classLabel(index)}`, el("span", {class: "muted small"}, ` · ${members.length}`)), row));
  }
}

const isScalar = (v) => v === null || ["string", "number", "boolean"].includes(typeof v);
const isNumber = (v) => typeof v === "number";
const isPlainObject = (v) => v !== null && typeof v === "object" && !Array.isArray(v);

function formatValue(v) {
  if (typeof v === "number") return Number.isInteger(v) ? String(v) : Math.abs(v) >= 1e4 || (Math.abs(v) < 1e-3 && v !== 0) ? v.toExponential(3) : v.toFixed(4);
  if (Array.isArray(v)) return v.every(isScalar) ? truncate(v.map(formatValue).join(", "), 80) : `[${v.length} items]`;
  if (isPlainObject(v)) return truncate(Object.entries(v).map(([k, x]) => `${k}: ${formatValue(x)}`).join(", "), 80);
  return String(v);
}

function renderReport(method) {
  const box = clear($("fit-report"));
  let report;
  try { report = JSON.parse(method.fit_report_json || "{}"); } catch (error) { report = {}; }
  const scalars = Object.entries(report).filter(([, v]) => isScalar(v));
  if (scalars.length) box.append(reportBlock("summary", keyValueTable(scalars)));
  for (const [key, value] of Object.entries(report)) {
    if (!isScalar(value)) box.append(reportBlock(key, reportValue(value, 1)));
  }
  if (!box.childElementCount) box.append(el("p", {class: "muted"}, "This method's archive has no fit report."));
}

function reportBlock(title, content) {
  return el("div", {class: "report-block"}, el("h3", {}, title.replaceAll("_", " ")), content);
}

function keyValueTable(entries) {
  return el("table", {class: "report-table kv"}, entries.map(([k, v]) => el("tr", {}, el("th", {}, k.replaceAll("_", " ")), el("td", {class: isNumber(v) ? "num" : ""}, formatValue(v)))));
}

function reportValue(value, depth) {
  if (Array.isArray(value)) {
    if (value.length && value.every(isNumber)) return sparkline(value);
    if (value.length && value.every((r) => Array.isArray(r) && r.every(isNumber))) return matrix(value);
    if (value.length && value.every(isPlainObject)) return recordsTable(value);
    return el("p", {}, formatValue(value));
  }
  if (isPlainObject(value)) {
    const entries = Object.entries(value);
    if (entries.every(([, v]) => isScalar(v))) return keyValueTable(entries);
    if (entries.every(([, v]) => isPlainObject(v) && Object.values(v).every(isScalar))) return matrixTable(entries);
    if (depth >= 3) return el("p", {}, formatValue(value));
    return el("div", {class: "nested"}, entries.map(([k, v]) => isScalar(v) ? keyValueTable([[k, v]]) : reportBlock(k, reportValue(v, depth + 1))));
  }
  return el("p", {}, formatValue(value));
}

function matrixTable(entries) {
  const columns = [...new Set(entries.flatMap(([, v]) => Object.keys(v)))];
  return el("div", {class: "scroll"}, el("table", {class: "report-table"},
    el("tr", {}, el("th", {}, ""), columns.map((c) => el("th", {}, c.replaceAll("_", " ")))),
    entries.map(([k, v]) => el("tr", {}, el("th", {}, k), columns.map((c) => el("td", {class: isNumber(v[c]) ? "num" : ""}, c in v ? formatValue(v[c]) : ""))))));
}

function recordsTable(rows) {
  const columns = [...new Set(rows.flatMap((r) => Object.keys(r)))];
  const numeric = columns.filter((c) => rows.every((r) => isNumber(r[c])));
  const content = el("div", {});
  if (rows.length >= 3 && numeric.length >= 2) content.append(lineChart(rows, numeric[0], numeric.slice(1)));
  const table = el("table", {class: "report-table"}, el("tr", {}, columns.map((c) => el("th", {}, c.replaceAll("_", " ")))),
    rows.slice(0, REPORT_MAX_ROWS).map((r) => el("tr", {}, columns.map((c) => el("td", {class: isNumber(r[c]) ? "num" : ""}, c in r ? formatValue(r[c]) : "")))));
  content.append(el("div", {class: "scroll"}, table));
  if (rows.length > REPORT_MAX_ROWS) content.append(el("p", {class: "muted small"}, `… and ${rows.length - REPORT_MAX_ROWS} more rows`));
  return content;
}

function lineChart(rows, xKey, yKeys) {
  const width = 420, height = 150, pad = 34;
  const xs = rows.map((r) => r[xKey]);
  const chart = svg("svg", {viewBox: `0 0 ${width} ${height + 20}`, class: "line-chart"});
  const xScale = chartScale(Math.min(...xs), Math.max(...xs), width - 2 * pad);
  yKeys.slice(0, 4).forEach((key, k) => {
    const ys = rows.map((r) => r[key]);
    const lo = Math.min(...ys), hi = Math.max(...ys), span = hi - lo || 1;
    const points = rows.map((r, i) => `${i ? "L" : "M"}${(pad + xScale(r[xKey])).toFixed(1)},${(height - pad / 2 - ((r[key] - lo) / span) * (height - pad)).toFixed(1)}`).join("");
    chart.append(svg("path", {d: points, class: `series-line s${k}`}));
    chart.append(svg("text", {x: pad + 110 * k, y: height + 14, class: `legend-text s${k}`}, `${key} (${formatValue(lo)}–${formatValue(hi)})`));
  });
  chart.append(svg("text", {x: width - pad, y: height - 2, class: "axis-text", "text-anchor": "end"}, `${xKey} →`));
  return chart;
}

function sparkline(values) {
  const box = el("div", {class: "spark"});
  const chart = svg("svg", {viewBox: "0 0 240 40", class: "sparkline"});
  chart.append(svg("path", {d: seriesPath(values, 240, 40, 3), class: "series-line"}));
  box.append(chart, el("span", {class: "muted small"}, `${values.length} values, ${formatValue(Math.min(...values))} … ${formatValue(Math.max(...values))}`));
  return box;
}

function matrix(rows) {
  const n = rows.length, m = Math.max(...rows.map((r) => r.length));
  let extent = 0;
  for (const r of rows) for (const v of r) extent = Math.max(extent, Math.abs(v));
  const cell = Math.max(6, Math.min(18, Math.floor(240 / Math.max(n, m))));
  const chart = svg("svg", {viewBox: `0 0 ${m * cell} ${n * cell}`, class: "matrix", width: m * cell, height: n * cell});
  rows.forEach((r, i) => r.forEach((v, j) => {
    const [red, green, blue] = diverging(extent ? v / extent : 0);
    const rect = svg("rect", {x: j * cell, y: i * cell, width: cell, height: cell, fill: `rgb(${red},${green},${blue})`});
    rect.append(svg("title", {}, `[${i}, ${j}] ${formatValue(v)}`));
    chart.append(rect);
  }));
  return el("div", {class: "spark"}, chart, el("span", {class: "muted small"}, `${n}×${m}, ±${formatValue(extent)}`));
}

// ------------------------------------------------------------------------- start

function wire() {
  $("model-select").addEventListener("change", (event) => {
    const [name, version] = event.target.value.split("\u0000");
    selectModel(name, version).catch((e) => showError(e.message));
  });
  $("heatmap-select").addEventListener("change", (event) => { state.heatmap = event.target.value; drawInput(); });
  $("heatmap-opacity").addEventListener("input", drawInput);
  $("gallery-class").addEventListener("change", renderGallery);
  $("reset-suppressed").addEventListener("click", () => { state.suppressed.clear(); explain(); });
  const zone = $("drop-zone");
  const take = (file) => file && dropFile(file).catch((e) => showError(e.message));
  zone.addEventListener("dragover", (event) => { event.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (event) => { event.preventDefault(); zone.classList.remove("over"); take(event.dataTransfer.files[0]); });
  $("file-input").addEventListener("change", (event) => take(event.target.files[0]));
}

document.addEventListener("DOMContentLoaded", () => {
  wire();
  checkReady();
  loadModels().catch((error) => showError(error.message));
});
