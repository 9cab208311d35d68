// The m3jepa search page: offers the queries the served indexes and the model's directions allow, and
// shows the hits. Every text from the server goes into the page with textContent, never as HTML.
// A text search is also a URL: /?q=...&index=...&k=... opens the page with its results (a link to share,
// a headless screenshot), and each search made on the page puts its own URL in the address bar.
"use strict";

const $ = (id) => document.getElementById(id);
let maxK = 100;

function element(tag, attrs = {}, text = null) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) el.setAttribute(name, value);
  if (text !== null) el.textContent = text;
  return el;
}

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

function addOption(select, value, label) {
  select.appendChild(element("option", { value }, label));
}

async function start() {
  let health;
  try {
    health = await (await fetch("/health")).json();
  } catch (err) {
    setStatus(`the server did not answer: ${err}`, true);
    return;
  }
  maxK = health.limits.max_k;
  for (const k of [$("text-k"), $("file-k")]) k.value = String(health.limits.default_k);
  $("model").textContent = `model ${health.model.path} · directions ${health.model.directions.join(", ")}`;
  for (const index of health.indexes) {
    const label = `${index.name} (${index.rows} ${index.modality} rows)`;
    if (index.sources.includes("text")) addOption($("text-index"), index.name, label);
    for (const source of index.sources.filter((s) => s === "image" || s === "audio")) {
      addOption($("file-index"), `${source}:${index.name}`, `${source} → ${label}`);
    }
  }
  $("text-form").hidden = $("text-index").options.length === 0;
  $("file-form").hidden = $("file-index").options.length === 0;
  for (const k of [$("text-k"), $("file-k")]) k.max = String(maxK);
  if ($("text-form").hidden && $("file-form").hidden) setStatus("no served index answers a query", true);
  else setStatus("");
  searchFromUrl();
}

// /?q=...&index=...&k=...: fill the text form from the URL and search (index and k are optional).
function searchFromUrl() {
  const params = new URLSearchParams(window.location.search);
  const query = params.get("q");
  if (query === null || $("text-form").hidden) return;
  $("text-query").value = query;
  if (params.has("index")) {
    const wanted = params.get("index");
    if (![...$("text-index").options].some((o) => o.value === wanted)) {
      setStatus(`error: the URL names index ${JSON.stringify(wanted)}, which is not served here`, true);
      return;
    }
    $("text-index").value = wanted;
  }
  if (params.has("k")) $("text-k").value = params.get("k");
  searchText(false);
}

function searchText(remember) {
  const body = { text: $("text-query").value, k: Number($("text-k").value), index: $("text-index").value };
  if (remember) {  // the address bar now opens these results
    const url = new URL(window.location.href);
    url.search = new URLSearchParams({ q: body.text, index: body.index, k: String(body.k) }).toString();
    window.history.replaceState(null, "", url);
  }
  post("/api/search", { headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
}

async function post(url, init) {
  setStatus("searching…");
  $("results").replaceChildren();
  let response, body;
  try {
    response = await fetch(url, { method: "POST", ...init });
    body = await response.json();
  } catch (err) {
    setStatus(`the search failed: ${err}`, true);
    return;
  }
  if (!response.ok) {
    setStatus(`error ${response.status}: ${body.error}`, true);
    return;
  }
  show(body);
}

function show(answer) {
  setStatus(`${answer.hits.length} hits of ${answer.gallery_size.toLocaleString("en")} ${answer.gallery} ` +
            `rows in ${answer.index} (${answer.direction}), ${answer.took_ms.toFixed(1)} ms`);
  const results = $("results");
  if (answer.gallery === "text") {
    const list = element("ol", { class: "captions" });
    for (const hit of answer.hits) {
      const item = element("li", { class: "hit-caption", "data-row-id": hit.row_id, "data-rank": hit.rank });
      item.append(element("span", { class: "caption" }, hit.caption ?? hit.id), " ",
                  element("span", { class: "score" }, hit.score.toFixed(3)));
      list.appendChild(item);
    }
    results.appendChild(list);
    return;
  }
  const grid = element("div", { class: "grid" });
  for (const hit of answer.hits) grid.appendChild(figure(hit, answer.gallery));
  results.appendChild(grid);
}

function figure(hit, gallery) {
  const fig = element("figure", { class: "hit", "data-row-id": hit.row_id, "data-rank": hit.rank });
  const caption = hit.caption ?? hit.id;
  if (hit.media && gallery === "image") fig.appendChild(element("img", { src: hit.media, alt: caption }));
  if (hit.media && gallery === "audio") fig.appendChild(element("audio", { src: hit.media, controls: "" }));
  const text = element("figcaption");
  text.append(element("span", { class: "caption" }, caption), " ",
              element("span", { class: "score" }, hit.score.toFixed(3)));
  fig.appendChild(text);
  return fig;
}

$("text-form").addEventListener("submit", (event) => {
  event.preventDefault();
  searchText(true);
});

$("file-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const [source, index] = $("file-index").value.split(/:(.*)/s);
  const form = new FormData();
  form.append("file", $("file-query").files[0]);
  form.append("k", $("file-k").value);
  form.append("index", index);
  post(`/api/search/${source}`, { body: form });
});

start();
