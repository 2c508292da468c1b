// alignax studio: the three pages' behaviour (no build step, no dependencies).
"use strict";

const $ = (id) => document.getElementById(id);

function showError(message) {
  const box = $("error");
  box.textContent = message || "";
  box.hidden = !message;
}

async function api(path, body) {
  const opts = body === undefined ? {} : {method: "POST", headers: {"Content-Type": "application/json"},
                                          body: JSON.stringify(body)};
  let res;
  try {
    res = await fetch(path, opts);
  } catch (e) {
    throw new Error("the studio server is not reachable (" + e.message + ")");
  }
  let data;
  try { data = await res.json(); } catch (e) { data = {error: res.status + " " + res.statusText}; }
  if (!res.ok || data.error) throw new Error(data.error || res.statusText);
  return data;
}

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v; else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);
  return node;
}

function settingsFrom(ids) {
  const out = {};
  for (const id of ids) if ($(id)) out[id] = $(id).value;
  return out;
}

// ------------------------------------------------------------------------------------- compare

const SETTINGS = ["temperature", "top_p", "max_new_tokens", "seed", "num_samples"];

function answerCard(name, result) {
  const card = el("div", {class: "card", "data-model": name}, el("h3", {}, name));
  if (result.error) { card.append(el("div", {class: "error"}, result.error)); return card; }
  for (const a of result.answers) {
    const gold = el("span", {class: "gold " + (a.score >= 0 ? "pos" : "neg")}, "gold " + a.score.toFixed(2));
    const row = el("div", {class: "answer"}, el("div", {class: "text"}, a.text || "(empty)"), gold);
    if (!a.ended) row.append(el("span", {class: "flag"}, "no <eos>"));
    const comps = Object.entries(a.components).map(([k, v]) => k + " " + (v > 0 ? "+" : "") + v.toFixed(2));
    row.append(el("div", {class: "components"}, comps.join(" · ")));
    card.append(row);
  }
  return card;
}

function selectedModels() {
  return [...document.querySelectorAll("#model-boxes input:checked")].map((x) => x.value);
}

function viewQuery() {
  const q = new URLSearchParams({prompt: $("prompt").value, ...settingsFrom(SETTINGS)});
  q.set("models", selectedModels().join(","));
  return q;
}

async function runCompare() {
  showError("");
  const button = $("answer");
  button.disabled = true;
  button.textContent = "Sampling…";
  const query = viewQuery();
  history.replaceState(null, "", "?" + query.toString());
  $("permalink").href = "?" + query.toString();
  try {
    const data = await api("/api/answer", {prompt: $("prompt").value, models: selectedModels(),
                                           ...settingsFrom(SETTINGS)});
    const results = $("results");
    results.replaceChildren();
    for (const [name, result] of Object.entries(data.results)) results.append(answerCard(name, result));
    results.dataset.done = "1";
  } catch (e) {
    showError(e.message);
  } finally {
    button.disabled = false;
    button.textContent = "Answer";
  }
}

async function searchPrompts() {
  try {
    const data = await api("/api/prompts?q=" + encodeURIComponent($("search").value));
    const list = $("prompt-list");
    list.replaceChildren();
    for (const p of data.prompts) {
      const item = el("li", {}, p.prompt, el("span", {class: "kind"}, p.kind));
      item.onclick = () => { $("prompt").value = p.prompt; };
      list.append(item);
    }
  } catch (e) { showError(e.message); }
}

function initCompare() {
  const params = new URLSearchParams(location.search);
  const chosen = (params.get("models") || "").split(",").filter(Boolean);
  for (const name of window.STUDIO.models) {
    const box = el("input", {type: "checkbox", value: name});
    box.checked = chosen.length === 0 || chosen.includes(name);
    $("model-boxes").append(el("label", {}, box, " " + name));
  }
  for (const id of SETTINGS) if (params.has(id)) $(id).value = params.get(id);
  if (params.has("prompt")) $("prompt").value = params.get("prompt");
  $("answer").onclick = runCompare;
  $("search").oninput = searchPrompts;
  $("prompt").onkeydown = (e) => { if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); runCompare(); } };
  searchPrompts();
  if (params.get("prompt")) runCompare();
}

// --------------------------------------------------------------------------------------- label

let currentPair = null;

async function newPair() {
  showError("");
  currentPair = null;
  delete document.body.dataset.pair;
  $("pair-prompt").textContent = "Sampling a pair…";
  $("resp-a").textContent = "";
  $("resp-b").textContent = "";
  try {
    const pair = await api("/api/pair", {model_a: $("model_a").value, model_b: $("model_b").value,
                                         ...settingsFrom(["temperature", "max_new_tokens"])});
    currentPair = pair;
    $("pair-prompt").textContent = pair.prompt;
    $("resp-a").textContent = pair.a || "(empty)";
    $("resp-b").textContent = pair.b || "(empty)";
    document.body.dataset.pair = pair.pair_id;
  } catch (e) {
    $("pair-prompt").textContent = "";
    showError(e.message);
  }
}

async function choose(choice) {
  if (!currentPair) return;
  const pair = currentPair;
  currentPair = null;
  try {
    const saved = await api("/api/label", {pair_id: pair.pair_id, choice, note: $("note").value,
                                           rater: $("rater").value});
    $("note").value = "";
    $("label-status").textContent = `Saved "${choice}": A was ${saved.shown[0]}, B was ${saved.shown[1]}. ` +
      `${saved.labels} labels and ${saved.ties} ties so far.`;
    document.body.dataset.labels = String(saved.labels + saved.ties);
  } catch (e) { showError(e.message); }
  newPair();
}

function initLabel() {
  for (const [i, id] of ["model_a", "model_b"].entries()) {
    for (const name of window.STUDIO.models) $(id).append(el("option", {value: name}, name));
    const models = window.STUDIO.models;
    $(id).value = models[i === 0 ? Math.min(1, models.length - 1) : models.length - 1];
  }
  $("new-pair").onclick = newPair;
  $("pick-a").onclick = () => choose("A");
  $("pick-b").onclick = () => choose("B");
  $("pick-tie").onclick = () => choose("tie");
  document.addEventListener("keydown", (e) => {
    if (["INPUT", "TEXTAREA", "SELECT"].includes(document.activeElement.tagName)) return;
    const key = e.key.toLowerCase();
    if (key === "a" || key === "1") choose("A");
    else if (key === "b" || key === "2") choose("B");
    else if (key === "t" || key === "3") choose("tie");
  });
  newPair();
}

// -------------------------------------------------------------------------------------- signal

function barChart(components) {
  const names = Object.keys(components);
  const w = 640, row = 30, left = 130, top = 24, width = w - left - 90;
  const h = top + row * names.length + 30;
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("width", w); svg.setAttribute("height", h); svg.setAttribute("id", "chart");
  const add = (tag, attrs, text) => {
    const n = document.createElementNS(ns, tag);
    for (const [k, v] of Object.entries(attrs)) n.setAttribute(k, v);
    if (text !== undefined) n.textContent = text;
    svg.append(n); return n;
  };
  names.forEach((name, i) => {
    const c = components[name], y = top + i * row;
    add("text", {x: left - 8, y: y + 18, "text-anchor": "end", "font-size": 13}, name);
    add("rect", {x: left, y: y + 4, width: width, height: 20, fill: "#eef0f3"});
    add("rect", {x: left, y: y + 4, width: width * c.prefers_higher, height: 20,
                 fill: c.prefers_higher >= 0.5 ? "#3d8b4f" : "#c0473a", class: "bar"});
    add("text", {x: left + width + 8, y: y + 18, "font-size": 12},
        c.prefers_higher.toFixed(2) + " (" + c.pairs + ")");
  });
  add("line", {x1: left + width / 2, x2: left + width / 2, y1: top, y2: h - 24, stroke: "#1d2430",
               "stroke-dasharray": "4 3"});
  add("text", {x: left + width / 2, y: h - 8, "text-anchor": "middle", "font-size": 12}, "0.5: indifferent");
  return svg;
}

async function initSignal() {
  try {
    const s = await api("/api/signal");
    const summary = $("signal-summary");
    const done = s.labels + s.ties;
    if (!s.ready) {
      summary.append(el("div", {}, `Label at least ${s.min_labels} pairs to see your reward signal ` +
                                   `(${done} so far).`));
      return;
    }
    const agree = s.gold_agreement === null ? "–" : (100 * s.gold_agreement).toFixed(0) + "%";
    summary.append(el("div", {}, el("b", {}, String(s.labels)), "preferences"),
                   el("div", {}, el("b", {}, String(s.ties)), "ties"),
                   el("div", {id: "gold-agreement"}, el("b", {}, agree),
                      `agreement with the gold labeler (${s.gold_pairs} pairs)`));
    $("signal-chart").append(barChart(s.components));
  } catch (e) { showError(e.message); }
}

const PAGES = {compare: initCompare, label: initLabel, signal: initSignal};
PAGES[document.body.dataset.page]();
