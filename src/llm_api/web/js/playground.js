// The playground: a streamed chat with one model. The conversation and the settings are kept in
// localStorage (they never hold a credential); every message is rendered as text.

import { api } from "./api.js";
import { $, fmtInt, h, mount, notice } from "./dom.js";
import { sseEvents } from "./sse.js";

const STORE_KEY = "llm-api.conversation";

const state = load();
let controller = null; // AbortController of the reply being streamed
let root = null;

function load() {
  const fresh = { messages: [], system: "", model: "", temperature: 0.7, max_tokens: 256 };
  try {
    const saved = JSON.parse(localStorage.getItem(STORE_KEY) || "null");
    if (saved && Array.isArray(saved.messages)) {
      saved.messages = saved.messages.filter(
        (m) => m && typeof m.content === "string" && (m.role === "user" || m.role === "assistant"),
      );
      return { ...fresh, ...saved };
    }
  } catch {
    // a corrupt entry starts a new conversation
  }
  return fresh;
}

function save() {
  localStorage.setItem(STORE_KEY, JSON.stringify(state));
}

function metaText(meta) {
  if (!meta) return "";
  const parts = [];
  if (meta.model) parts.push(meta.model);
  if (meta.usage) {
    const u = meta.usage;
    parts.push(
      `${fmtInt(u.prompt_tokens)} prompt + ${fmtInt(u.completion_tokens)} completion = ` +
        `${fmtInt(u.total_tokens)} tokens`,
    );
  }
  if (meta.ttft_ms !== undefined && meta.ttft_ms !== null) {
    parts.push(`TTFT ${Math.round(meta.ttft_ms)} ms`);
  }
  if (meta.total_ms) parts.push(`${(meta.total_ms / 1000).toFixed(2)} s`);
  if (meta.finish) parts.push(`finish: ${meta.finish}`);
  if (meta.stopped) parts.push("stopped");
  if (meta.error) parts.push(`error: ${meta.error}`);
  return parts.join(" · ");
}

function messageView(message) {
  return h(
    "li",
    { class: `msg ${message.role}`, dataset: { role: message.role } },
    h("div", { class: "who" }, message.role === "user" ? "You" : "Assistant"),
    h("div", { class: "content" }, message.content),
    message.role === "assistant" ? h("div", { class: "meta" }, metaText(message.meta)) : null,
  );
}

function renderMessages() {
  const list = $("#messages", root);
  mount(list, state.messages.map(messageView));
  if (state.messages.length === 0) {
    list.append(h("li", { class: "empty" }, "Say something to start a conversation."));
  }
  list.scrollTop = list.scrollHeight;
}

function setBusy(busy) {
  $("#send", root).disabled = busy;
  $("#stop", root).disabled = !busy;
  $("#prompt", root).disabled = busy;
}

function readSettings() {
  state.model = $("#model", root).value;
  state.system = $("#system", root).value;
  state.temperature = Number($("#temperature", root).value);
  state.max_tokens = Number.parseInt($("#max-tokens", root).value, 10);
  save();
}

async function send(text) {
  readSettings();
  const history = state.messages.map(({ role, content }) => ({ role, content }));
  const messages = state.system.trim()
    ? [{ role: "system", content: state.system }, ...history]
    : history;
  messages.push({ role: "user", content: text });
  state.messages.push({ role: "user", content: text });
  const reply = { role: "assistant", content: "", meta: { model: state.model } };
  state.messages.push(reply);
  save();
  renderMessages();
  const item = $("#messages", root).lastElementChild;
  const contentEl = $(".content", item);
  const metaEl = $(".meta", item);

  controller = new AbortController();
  setBusy(true);
  const started = performance.now();
  try {
    const response = await api("/v1/chat/completions", {
      method: "POST",
      raw: true,
      signal: controller.signal,
      json: {
        model: state.model,
        messages,
        temperature: state.temperature,
        max_tokens: state.max_tokens,
        stream: true,
        stream_options: { include_usage: true },
      },
    });
    for await (const chunk of sseEvents(response)) {
      if (chunk.usage) reply.meta.usage = chunk.usage;
      for (const choice of chunk.choices || []) {
        const piece = choice.delta && choice.delta.content;
        if (piece) {
          if (reply.meta.ttft_ms === undefined) reply.meta.ttft_ms = performance.now() - started;
          reply.content += piece;
          contentEl.append(piece); // a text node: markup in the reply stays text
          metaEl.textContent = `streaming… TTFT ${Math.round(reply.meta.ttft_ms)} ms`;
        }
        if (choice.finish_reason) reply.meta.finish = choice.finish_reason;
      }
    }
  } catch (err) {
    if (err.name === "AbortError") reply.meta.stopped = true;
    else reply.meta.error = err.message;
  } finally {
    reply.meta.total_ms = performance.now() - started;
    controller = null;
    setBusy(false);
    save();
    metaEl.textContent = metaText(reply.meta);
    item.dataset.done = "true";
    $("#prompt", root).focus();
  }
}

function stop() {
  if (controller) controller.abort(); // closes the connection: the server cancels generation
}

function clear() {
  stop();
  state.messages = [];
  save();
  renderMessages();
}

async function loadModels() {
  const select = $("#model", root);
  const status = $("#models-status", root);
  try {
    const list = await api("/v1/models");
    const ids = list.data.map((m) => m.id);
    mount(
      select,
      list.data.map((m) => h("option", { value: m.id }, m.tier === "paid" ? `${m.id} (paid)` : m.id)),
    );
    if (ids.includes(state.model)) select.value = state.model;
    state.model = select.value;
    mount(status);
  } catch (err) {
    mount(status, notice(`Could not list models: ${err.message}`));
  }
}

function build() {
  return h(
    "div",
    { class: "playground" },
    h(
      "form",
      { class: "panel settings", id: "settings", onchange: readSettings },
      h("h2", {}, "Settings"),
      h("label", { for: "model" }, "Model"),
      h("select", { id: "model", name: "model" }),
      h("div", { id: "models-status" }),
      h("label", { for: "system" }, "System prompt"),
      h("textarea", { id: "system", rows: 4, placeholder: "You are a helpful assistant." }),
      h("label", { for: "temperature" }, "Temperature"),
      h("input", { id: "temperature", type: "number", min: 0, max: 2, step: 0.1 }),
      h("label", { for: "max-tokens" }, "Max tokens"),
      h("input", { id: "max-tokens", type: "number", min: 1, max: 8192, step: 1 }),
      h("button", { type: "button", id: "clear", class: "secondary", onclick: clear }, "Clear chat"),
    ),
    h(
      "div",
      { class: "panel chat" },
      h("ol", { id: "messages", class: "messages", "aria-live": "polite" }),
      h(
        "form",
        {
          class: "composer",
          id: "composer",
          onsubmit: (event) => {
            event.preventDefault();
            const prompt = $("#prompt", root);
            const text = prompt.value.trim();
            if (!text || controller) return;
            prompt.value = "";
            send(text);
          },
        },
        h("textarea", {
          id: "prompt",
          rows: 3,
          placeholder: "Message the model (Enter to send, Shift+Enter for a new line)",
          onkeydown: (event) => {
            if (event.key === "Enter" && !event.shiftKey) {
              event.preventDefault();
              $("#composer", root).requestSubmit();
            }
          },
        }),
        h(
          "div",
          { class: "actions" },
          h("button", { type: "submit", id: "send" }, "Send"),
          h("button", { type: "button", id: "stop", class: "danger", disabled: true, onclick: stop }, "Stop"),
        ),
      ),
    ),
  );
}

export function show(container) {
  if (root === null) {
    root = build();
    $("#system", root).value = state.system;
    $("#temperature", root).value = String(state.temperature);
    $("#max-tokens", root).value = String(state.max_tokens);
  }
  mount(container, root);
  renderMessages();
  loadModels();
}

export function hide() {}
