// The page of `minigpt serve`: stream a completion, shade each token by its probability,
// and show the attention of the step that wrote a clicked token. Plain browser JavaScript:
// no build step, no library, nothing loaded from elsewhere.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORAGE = "minigpt.apiKey";

const state = {
  model: null, // the served model's id, from /v1/models
  ids: [], // every token id so far: the prompt's, then the written ones
  controller: null, // aborts the running stream (Stop)
};

// --------------------------------------------------------------------------- requests

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

// The message of a failed response: OpenAI's error object, or the status line.
async function errorText(response) {
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) return body.error.message;
  } catch (_) {
    // not JSON: fall through to the status
  }
  return `${response.status} ${response.statusText}`;
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

async function modelId() {
  if (state.model) return state.model;
  const response = await fetch("/v1/models", { headers: headers() });
  if (!response.ok) throw new Error(await errorText(response));
  const body = await response.json();
  state.model = body.data[0].id;
  $("model").textContent = state.model;
  return state.model;
}

function numberField(id) {
  const text = $(id).value.trim();
  return text === "" ? undefined : Number(text);
}

function completionRequest(model) {
  return {
    model,
    prompt: $("prompt").value,
    max_tokens: numberField("max-tokens") ?? 64,
    temperature: numberField("temperature") ?? 1,
    top_k: numberField("top-k"),
    top_p: numberField("top-p"),
    seed: numberField("seed"),
    stream: true,
    logprobs: 1,
    return_token_ids: true,
  };
}

// The `data:` payloads of a server-sent event stream, as they arrive.
async function* serverEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true }).replace(/\r\n?/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const lines = buffer.slice(0, end).split("\n");
      buffer = buffer.slice(end + 2);
      const data = lines.filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim());
      if (data.length) yield data.join("\n");
    }
  }
}

// --------------------------------------------------------------------------- generating

async function generate() {
  showError("");
  $("output").replaceChildren();
  $("attention").hidden = true;
  state.ids = [];
  state.controller = new AbortController();
  setRunning(true);
  try {
    const body = completionRequest(await modelId());
    const response = await fetch("/v1/completions", {
      method: "POST",
      headers: headers(),
      body: JSON.stringify(body),
      signal: state.controller.signal,
    });
    if (!response.ok) throw new Error(await errorText(response));
    for await (const data of serverEvents(response)) {
      if (data === "[DONE]") break;
      addChunk(JSON.parse(data));
    }
  } catch (err) {
    if (err.name !== "AbortError") showError(err.message);
  } finally {
    setRunning(false);
  }
}

function setRunning(running) {
  $("generate").textContent = running ? "Stop" : "Generate";
  $("output").classList.toggle("running", running);
  if (!running) state.controller = null;
}

function addChunk(chunk) {
  if (chunk.error) throw new Error(chunk.error.message);
  for (const choice of chunk.choices || []) {
    if (choice.index !== 0) continue;
    const promptIds = choice.prompt_token_ids || chunk.prompt_token_ids;
    if (promptIds && state.ids.length === 0) {
      state.ids = promptIds.slice();
      addPrompt($("prompt").value);
    }
    const logprobs = choice.logprobs || {};
    (choice.token_ids || []).forEach((id, k) => {
      const text = logprobs.tokens ? logprobs.tokens[k] : choice.text;
      const logprob = logprobs.token_logprobs ? logprobs.token_logprobs[k] : null;
      addToken(id, text, logprob);
    });
  }
}

function addPrompt(text) {
  const span = document.createElement("span");
  span.className = "prompt";
  span.textContent = text;
  $("output").append(span);
}

// One written token: a span shaded by its probability, clickable for its step's attention.
function addToken(id, text, logprob) {
  const index = state.ids.length;
  state.ids.push(id);
  const span = document.createElement("span");
  span.className = "tok";
  span.dataset.index = index;
  span.textContent = visible(text || "");
  if (logprob !== null && logprob !== undefined) {
    const p = Math.exp(logprob);
    span.dataset.prob = p.toFixed(6);
    span.style.backgroundColor = `rgba(37, 99, 235, ${(0.08 + 0.72 * p).toFixed(3)})`;
    span.title = `token ${index}: p = ${p.toFixed(4)}`;
  }
  span.addEventListener("click", () => showAttention(index));
  $("output").append(span);
}

// Whitespace that would be invisible (or unclickable) gets a mark before it.
function visible(text) {
  if (text === "") return "\u2205";
  return text.replace(/\n/g, "\u21b5\n").replace(/\t/g, "\u2192\t");
}

// --------------------------------------------------------------------------- attention

async function showAttention(index) {
  showError("");
  for (const el of document.querySelectorAll(".tok.selected")) el.classList.remove("selected");
  document.querySelector(`.tok[data-index="${index}"]`)?.classList.add("selected");
  try {
    const response = await fetch("/api/attention", {
      method: "POST",
      headers: headers(),
      body: JSON.stringify({ token_ids: state.ids.slice(0, index + 1), position: index }),
    });
    if (!response.ok) throw new Error(await errorText(response));
    renderGrid(await response.json(), index);
  } catch (err) {
    showError(err.message);
  }
}

// One row per (layer, head), one cell per key token, shaded by its weight.
function renderGrid(step, index) {
  const table = document.createElement("table");
  table.classList.toggle("long-keys", step.tokens.some((label) => label.length > 2));
  const header = table.insertRow();
  header.append(document.createElement("th"));
  step.tokens.forEach((label, k) => {
    const th = document.createElement("th");
    th.className = "key";
    th.textContent = label.replace(/ /g, "\u2423");
    th.title = `${JSON.stringify(label)} at position ${step.start + k}`;
    if (step.start + k === step.query) th.classList.add("query");
    header.append(th);
  });
  step.layers.forEach((heads, layer) => {
    heads.forEach((weights, head) => {
      const row = table.insertRow();
      const name = document.createElement("th");
      const role = step.roles[layer][head];
      name.className = "head";
      name.textContent = `L${layer} H${head}${role ? " " + role : ""}`;
      row.append(name);
      weights.forEach((w, k) => row.append(cell(layer, head, step.start + k, w, step.tokens[k])));
    });
  });
  $("grid").replaceChildren(table);
  const shown = step.tokens[step.tokens.length - 1];
  $("attention-title").textContent =
    `Attention of the step that wrote token ${index}: query ${step.query} (${shown}), ` +
    `keys ${step.start} to ${step.query}`;
  $("attention").hidden = false;
}

function cell(layer, head, key, weight, label) {
  const td = document.createElement("td");
  td.dataset.layer = layer;
  td.dataset.head = head;
  td.dataset.key = key;
  td.dataset.weight = weight;
  td.title = `L${layer} H${head} \u2192 ${JSON.stringify(label)} (position ${key}): ${weight.toFixed(4)}`;
  td.style.backgroundColor = `rgba(220, 80, 30, ${Math.sqrt(weight).toFixed(3)})`;
  return td;
}

// --------------------------------------------------------------------------- wiring

$("api-key").value = localStorage.getItem(KEY_STORAGE) || "";
$("api-key").addEventListener("change", () => {
  localStorage.setItem(KEY_STORAGE, $("api-key").value.trim());
  state.model = null;
});
$("form").addEventListener("submit", (event) => {
  event.preventDefault();
  if (state.controller) state.controller.abort();
  else generate();
});
modelId().catch(() => {}); // shows the model's name when no key is needed yet
