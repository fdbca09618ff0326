// lmpipe inspect: three views over the JSON API (flows/inspector/app.py), routed by the URL hash:
//   #/doc?split=&doc=&column=&q=&order=&model=&at=   a document coloured by a per-token column
//   #/latents?q=&order=   #/latent/<id>                 SAE latent dashboards
//   #/run                                               the run's plots and summary tables
"use strict";

const $ = (selector, root = document) => root.querySelector(selector);
const state = {overview: null, doc: null, column: null, spans: []};

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "text") node.textContent = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  node.append(...children);
  return node;
}

async function api(path, params = {}) {
  const query = new URLSearchParams(Object.entries(params).filter(([, v]) => v !== undefined && v !== ""));
  const response = await fetch(`/api/${path}?${query}`);
  const body = await response.json().catch(() => ({error: `${response.status} ${response.statusText}`}));
  if (!response.ok || (body && body.error)) throw new Error(body.error || response.statusText);
  return body;
}

function message(text) {
  const box = $("#message");
  box.textContent = text || "";
  box.hidden = !text;
}

function fmt(value) {
  if (value === null || value === undefined) return "–";
  if (typeof value !== "number") return String(value);
  return Number.isInteger(value) ? String(value) : String(parseFloat(value.toPrecision(4)));
}

function route() {
  const [path, query] = location.hash.replace(/^#/, "").split("?");
  const params = Object.fromEntries(new URLSearchParams(query || ""));
  const parts = path.split("/").filter(Boolean);
  document.querySelectorAll("nav a").forEach((a) => a.classList.toggle("active", a.dataset.view === (parts[0] === "latent" ? "latents" : parts[0] || "doc")));
  message("");
  $("#tip").hidden = true;
  const view = parts[0] === "latent" ? showLatent(Number(parts[1]))
    : parts[0] === "latents" ? showLatents(params)
    : parts[0] === "run" ? showRun() : showDocuments(params);
  view.catch((err) => message(err.message));
}

function go(view, params) {
  const query = new URLSearchParams(Object.entries(params).filter(([, v]) => v !== undefined && v !== ""));
  location.hash = `#/${view}?${query}`;
}

// ---- document view ----------------------------------------------------------------------------------------

const ORDERS = [["doc_id", "search text"], ["selection_desc", "highest selection rate"],
  ["selection_asc", "lowest selection rate"], ["excess_desc", "highest excess loss"],
  ["excess_asc", "lowest excess loss"]];

async function showDocuments(params) {
  const overview = state.overview;
  if (overview.error) throw new Error(overview.error);
  const split = params.split || (overview.splits.find((s) => s.split === "val") || overview.splits[0]).split;
  const order = params.order || "doc_id";
  const models = order.startsWith("selection") ? overview.selection_models
    : order.startsWith("excess") ? overview.probe_models : [];
  const model = models.includes(params.model) ? params.model : models[0] || "";
  const search = el("input", {id: "doc-search", type: "search", placeholder: "search the text", value: params.q || ""});
  const form = el("form", {id: "doc-form", onsubmit: (e) => {
    e.preventDefault();
    go("doc", {split: $("#split").value, q: search.value, order: $("#order").value, model: $("#model").value,
      column: params.column});
  }},
  el("label", {text: "split "}, select("split", overview.splits.map((s) => [s.split, `${s.split} (${s.documents})`]), split)),
  el("label", {text: "list "}, select("order", ORDERS, order)),
  el("label", {text: "model "}, select("model", models.map((m) => [m, m]), model)),
  search, el("button", {type: "submit", text: "find"}));
  form.addEventListener("change", () => form.requestSubmit());
  const list = el("ol", {id: "doc-list"});
  $("#side").replaceChildren(form, list);
  const docs = await api("documents", {split, q: params.q || "", order, model, limit: 50});
  for (const d of docs) {
    const label = d.value !== undefined ? `doc ${d.doc_id}: ${fmt(d.value)} (${d.tokens} tokens)` : `doc ${d.doc_id}`;
    const link = el("a", {href: `#/doc?${new URLSearchParams({...params, split, doc: d.doc_id, order, model})}`,
      text: label});
    list.append(el("li", {}, link, d.snippet ? el("div", {class: "snippet", text: d.snippet}) : ""));
  }
  if (!docs.length) list.append(el("li", {text: "no document matches"}));
  const docId = params.doc !== undefined ? params.doc : docs.length ? String(docs[0].doc_id) : null;
  if (docId === null) {
    $("#content").replaceChildren(el("p", {text: "Pick a document."}));
    return;
  }
  $("#content").replaceChildren(el("p", {text: "loading…"}));
  const doc = await api("document", {split, doc_id: docId, column: params.column});
  const column = params.column || preferredColumn(doc, order, model);
  renderDocument(doc, column, params);
}

function select(id, options, value) {
  const node = el("select", {id, name: id});
  for (const [v, label] of options) node.append(el("option", {value: v, text: label}));
  node.value = value;
  return node;
}

function preferredColumn(doc, order, model) {
  const ids = Object.keys(doc.values);
  const listed = order.startsWith("selection") ? `selected:${model}` : order.startsWith("excess") ? `excess_loss:${model}` : "";
  return ids.find((c) => c === listed) || ids.find((c) => c === "ref_loss") || ids[0] || null;
}

function renderDocument(doc, column, params) {
  state.doc = doc;
  const meta = Object.entries(doc.meta).filter(([k]) => !["split", "num_chars"].includes(k))
    .map(([k, v]) => `${k}: ${v}`).join(" · ");
  const columns = state.overview.columns;
  const choose = select("column", columns.map((c) => [c.id, doc.values[c.id] ? c.label : `${c.label} (none here)`]), column);
  choose.addEventListener("change", () => {
    history.replaceState(null, "", `#/doc?${new URLSearchParams({...params, split: doc.split, doc: doc.doc_id, column: choose.value})}`);
    colour(choose.value);
  });
  const text = el("div", {id: "doc-text"});
  const spans = new Array(doc.text.length);
  const fragment = document.createDocumentFragment();
  for (let i = 0; i < doc.text.length; i++) {
    const span = document.createElement("span");
    span.className = doc.special[i] ? "tok special" : doc.text[i] === "" ? "tok partial" : "tok";
    span.textContent = doc.special[i] ? `⟨${doc.text[i]}⟩` : doc.text[i];
    span.dataset.i = i;
    spans[i] = span;
    fragment.append(span);
  }
  text.append(fragment);
  state.spans = spans;
  $("#content").replaceChildren(
    el("h2", {text: `${doc.split} document ${doc.doc_id}`}), el("div", {class: "meta", text: meta}),
    el("div", {class: "toolbar"}, el("label", {text: "colour by "}, choose), el("div", {id: "legend"})),
    doc.truncated ? el("p", {class: "note", text: `showing the first ${doc.text.length} tokens`}) : "",
    text);
  text.addEventListener("mouseover", (e) => e.target.dataset.i !== undefined && showTip(e.target, Number(e.target.dataset.i)));
  text.addEventListener("mouseleave", () => { $("#tip").hidden = true; });
  text.addEventListener("click", (e) => {
    const i = Number(e.target.dataset.i);
    const labels = doc.concepts && doc.concepts[i];
    if (labels && labels.length) location.hash = `#/latent/${labels[0][0]}`;
  });
  colour(column);
  const values = doc.values[column] || [];
  const at = params.at !== undefined ? Number(params.at) - doc.first_index : values.findIndex((v) => v !== null);
  const target = spans[at];
  if (target && at > 0) {
    if (params.at !== undefined) target.classList.add("flash");
    text.scrollTop = target.offsetTop - text.offsetTop - text.clientHeight / 3;  // the text box scrolls, not the page
  }
}

function colour(column) {
  const doc = state.doc, spec = state.overview.columns.find((c) => c.id === column);
  if (column && !spec) {
    message(`this run has no column "${column}"; pick one from the list`);
    return;
  }
  state.column = column;
  const values = (column && doc.values[column]) || [];
  const legend = $("#legend");
  if (!values.length) {
    state.spans.forEach((s) => { s.style.backgroundColor = ""; s.classList.remove("dark"); });
    legend.replaceChildren(el("span", {text: column ? "no values of this column in this document" : ""}));
    return;
  }
  const scale = makeScale(spec.kind, values);
  for (let i = 0; i < state.spans.length; i++) {
    const v = values[i], span = state.spans[i];
    const has = v !== null && v !== undefined;
    span.style.backgroundColor = has ? scale.color(v) : "";
    span.classList.toggle("dark", has && scale.dark(v));
  }
  drawLegend(legend, spec, scale.legend);
}

function drawLegend(legend, spec, info) {
  if (info.kind === "category") {
    legend.replaceChildren(...info.classes.map(([c, color]) =>
      el("span", {class: "swatch", style: `background:${color}`, text: spec.id === "concept" ? `#${c}` : c})));
    return;
  }
  const bar = el("span", {class: "bar", style: `background: linear-gradient(to right, ${info.colors.join(", ")})`});
  legend.replaceChildren(el("span", {text: fmt(info.stops[0])}), bar, el("span", {text: fmt(info.stops[info.stops.length - 1])}),
    el("span", {class: "muted", text: " uncoloured: no value"}));
  legend.dataset.strongest = info.strongest;
}

function showTip(span, i) {
  const doc = state.doc, tip = $("#tip");
  const rows = [["token", JSON.stringify(doc.text[i])], ["token_index", doc.first_index + i],
    ["position", doc.position[i]], ["token_id", doc.token_id[i]]];
  for (const spec of state.overview.columns) {
    const values = doc.values[spec.id];
    if (values && spec.id !== "concept" && values[i] !== null) rows.push([spec.id, fmt(values[i])]);
  }
  const table = el("table", {}, ...rows.map(([k, v]) => el("tr", {"data-key": k}, el("th", {text: k}), el("td", {text: v}))));
  const parts = [table];
  if (doc.text[i] === "") parts.push(el("p", {text: "part of a character that the next token completes"}));
  const labels = doc.concepts && doc.concepts[i];
  if (labels && labels.length) {
    parts.push(el("p", {class: "muted", text: "concepts of the hidden state after this token (click: open the first)"}));
    parts.push(el("ul", {class: "labels"}, ...labels.map(([c, a]) =>
      el("li", {text: `#${c} (${fmt(a)}) ${(doc.concept_info[c] || []).join(", ")}`}))));
  }
  tip.replaceChildren(...parts);
  const box = span.getBoundingClientRect();
  tip.style.left = `${Math.min(box.left + window.scrollX, window.innerWidth - 380)}px`;
  tip.style.top = `${box.bottom + window.scrollY + 4}px`;
  tip.hidden = false;
}

// ---- concept view -----------------------------------------------------------------------------------------

async function showLatents(params, selected) {
  const form = el("form", {id: "latent-form", onsubmit: (e) => {
    e.preventDefault();
    go("latents", {q: $("#latent-search").value, order: $("#latent-order").value});
  }},
  el("input", {id: "latent-search", type: "search", placeholder: "latent id, a token or a word", value: params.q || ""}),
  select("latent-order", [["labelled", "most chosen as a label"], ["density", "densest"], ["rare", "rarest / dead"],
    ["id", "by id"]], params.order || "labelled"),
  el("button", {type: "submit", text: "find"}));
  const list = el("ol", {id: "latent-list"});
  $("#side").replaceChildren(form, list);
  const found = await api("latents", {q: params.q || "", order: params.order || "labelled", limit: 100});
  for (const l of found) {
    const text = `#${l.concept_id} · ${(100 * l.density).toFixed(2)}% · ${l.num_labelled} labels`;
    list.append(el("li", {class: l.dead ? "dead" : ""}, el("a", {href: `#/latent/${l.concept_id}`, text}),
      el("div", {class: "snippet", text: (l.top_tokens || []).slice(0, 3).join(" ")})));
  }
  if (!found.length) list.append(el("li", {text: "no latent matches"}));
  if (selected === undefined) {
    if (found.length && params.q) return showLatent(found[0].concept_id, true);
    $("#content").replaceChildren(el("p", {text: "Pick a latent."}));
  }
}

async function showLatent(id, listed = false) {
  if (!listed) showLatents({}, id).catch((err) => message(err.message));
  const l = await api(`latent/${id}`);
  const head = el("h2", {text: `latent #${l.concept_id}`}, l.dead ? el("span", {class: "badge", text: "dead"}) : "");
  const stats = el("p", {class: "meta", text: `active on ${fmt(100 * l.density)}% of ${l.num_tokens} tokens ` +
    `(${l.num_active}), chosen as a label ${l.num_labelled} times, max activation ${fmt(l.max_activation)}, ` +
    `mean when active ${fmt(l.mean_activation)}`});
  const chips = (direction) => el("div", {class: "chips"}, ...l.logits.filter((r) => r.direction === direction)
    .map((r) => el("span", {class: `chip ${direction}`, title: `logit ${fmt(r.logit)}`, text: JSON.stringify(r.text).slice(1, -1)})));
  const contexts = el("div", {id: "contexts"});
  for (const c of l.contexts) {
    const row = el("div", {class: "context"});
    const peak = c.token_index - c.start_index;
    c.text.forEach((piece, j) => {
      const a = c.activations[j];
      const span = el("span", {class: j === peak ? "tok peak" : "tok", text: piece, title: `activation ${fmt(a)}`});
      if (a > 0) span.style.backgroundColor = `rgba(255, 140, 0, ${0.1 + 0.9 * a / (l.max_activation || 1)})`;
      row.append(span);
    });
    const link = c.doc_id !== null ? el("a", {href: `#/doc?${new URLSearchParams({split: c.split, doc: c.doc_id, column: "concept", at: c.token_index})}`, text: "in document"}) : "";
    contexts.append(el("div", {class: "context-row"}, el("span", {class: "rank", text: `${c.rank}. ${fmt(c.activation)}`}), row, link));
  }
  $("#content").replaceChildren(head, stats,
    el("p", {class: "muted", text: `most frequent tokens when active: ${(l.top_tokens || []).join(", ") || "–"}`}),
    el("h3", {text: "promotes (decoder direction through the unembedding)"}), chips("promoted"),
    el("h3", {text: "suppresses"}), chips("suppressed"),
    el("h3", {text: `top-activating contexts (${l.contexts.length})`}), contexts.children.length ? contexts
      : el("p", {text: "none: this latent never fired on the scanned tokens"}));
}

// ---- run view ---------------------------------------------------------------------------------------------

async function showRun() {
  const run = await api("run");
  $("#side").replaceChildren(el("p", {class: "muted", text: "Each row links to the documents behind it."}));
  const parts = [el("h2", {text: "run"})];
  parts.push(el("h3", {text: "selection rate by domain"}), table(run.selection_by_domain, (r) =>
    `#/doc?${new URLSearchParams({split: "train", order: "selection_desc", model: `train_target.${r.model}`, column: `selected:train_target.${r.model}`})}`));
  const shown = ["model", "val_loss", "ref_val_loss", "ratio_to_baseline_val", "frac_h_to_l", "frac_l_to_l",
    "frac_h_to_h", "frac_l_to_h"];
  const comparison = typeof run.comparison === "string" ? run.comparison
    : run.comparison.map((r) => Object.fromEntries(shown.map((c) => [c, r[c]])));
  parts.push(el("h3", {text: "teacher (reference) and students: losses and loss dynamics"}), table(comparison, (r) =>
    r.model === "reference" ? "#/doc?split=val&column=ref_loss"
      : `#/doc?${new URLSearchParams({split: "val", order: "excess_desc", model: `train_target.${r.model}`, column: `dynamics:${r.model}`})}`));
  parts.push(el("h3", {text: "the report's plots"}));
  for (const name of run.plots) parts.push(el("figure", {}, el("img", {src: `/api/plot/${encodeURIComponent(name)}`, alt: name}), el("figcaption", {text: name})));
  $("#content").replaceChildren(...parts);
}

function table(rows, link) {
  if (typeof rows === "string") return el("p", {class: "muted", text: rows});
  if (!rows.length) return el("p", {class: "muted", text: "no rows"});
  const columns = Object.keys(rows[0]);
  return el("table", {class: "grid"}, el("tr", {}, ...columns.map((c) => el("th", {text: c})), el("th")),
    ...rows.map((r) => el("tr", {}, ...columns.map((c) => el("td", {text: fmt(r[c])})),
      el("td", {}, el("a", {href: link(r), text: "documents →"})))));
}

async function start() {
  try {
    state.overview = await api("overview");
  } catch (err) {
    message(err.message);
    return;
  }
  if (state.overview.error) message(state.overview.error);
  for (const warning of state.overview.warnings || []) message(warning);
  window.addEventListener("hashchange", route);
  route();
}

start();
