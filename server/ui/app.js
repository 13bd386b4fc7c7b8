// The chat page: settings, conversations, sending, streaming, stopping, regenerating and editing.

import { ApiError, listModels, streamChat } from "./api.js";
import { renderContent, el } from "./render.js";
import * as store from "./store.js";
import { openEditor, renderMessages } from "./view.js";

const $ = (id) => document.getElementById(id);
const ui = {};
const state = { chats: [], current: null, settings: store.loadSettings(), controller: null, live: null,
  frame: 0, storageWarned: false, shown: null };

function chat() {
  return state.chats.find((c) => c.id === state.current);
}

function save() {
  state.chats.sort((a, b) => b.updated - a.updated);
  if (store.saveChats(state.chats, state.current) || state.storageWarned) return;
  state.storageWarned = true; // said once per visit
  showError("This browser's storage is full or turned off: conversations will not be kept after a reload. " +
    "Delete old conversations to make room.");
}

/** Where focus goes when the control that had it disappeared (hidden or re-rendered away). */
function focusLost() {
  const active = document.activeElement;
  return !active || active === document.body || !active.isConnected;
}

// ---- errors -------------------------------------------------------------------------------------

function showError(message) {
  ui.alertText.textContent = message;
  ui.alert.hidden = false;
}

function clearError() {
  ui.alert.hidden = true;
  ui.alertText.textContent = "";
}

// ---- models and settings ------------------------------------------------------------------------

async function loadModels() {
  ui.modelNote.textContent = "loading models…";
  try {
    const ids = await listModels(ui.apiKey.value.trim());
    ui.model.replaceChildren(...ids.map((id) => new Option(id, id)));
    if (ids.includes(state.settings.model)) ui.model.value = state.settings.model;
    ui.modelNote.textContent = ids.length ? "" : "no model is served";
    if (!ui.alert.hidden && /API key|reach the server/.test(ui.alertText.textContent)) clearError();
  } catch (err) {
    ui.model.replaceChildren();
    ui.modelNote.textContent = "no model list";
    showError(err.message);
    if (err.status === 401) openSettings(ui.apiKey);
  }
}

function readSettings() {
  const maxTokens = parseInt(ui.maxTokens.value, 10);
  state.settings = {
    model: ui.model.value || state.settings.model,
    temperature: parseFloat(ui.temperature.value),
    top_p: parseFloat(ui.topP.value),
    max_tokens: Number.isFinite(maxTokens) && maxTokens > 0 ? maxTokens : null,
  };
  ui.temperatureValue.textContent = ui.temperature.value;
  ui.topPValue.textContent = ui.topP.value;
  store.saveSettings(state.settings);
}

function showSettings() {
  ui.temperature.value = state.settings.temperature;
  ui.topP.value = state.settings.top_p;
  ui.maxTokens.value = state.settings.max_tokens ?? "";
  ui.apiKey.value = store.loadKey();
  readSettings();
}

// ---- conversations ------------------------------------------------------------------------------

function renderSidebar() {
  const hadFocus = ui.chatList.contains(document.activeElement);
  const items = state.chats.map((c) => {
    const li = el("li", c.id === state.current ? "chat-item current" : "chat-item");
    const open = el("button", "chat-open", c.title);
    open.type = "button";
    if (c.id === state.current) open.setAttribute("aria-current", "true");
    open.addEventListener("click", () => switchTo(c.id));
    const del = el("button", "chat-delete", "✕");
    del.type = "button";
    del.setAttribute("aria-label", `Delete conversation: ${c.title}`);
    del.addEventListener("click", () => deleteChat(c.id));
    li.append(open, del);
    return li;
  });
  ui.chatList.replaceChildren(...items);
  if (hadFocus) ui.chatList.querySelector("[aria-current]").focus(); // keep the keyboard's place in the list
}

/** Show the open conversation; it scrolls to its end unless the reader scrolled up in it (keepScroll). */
function render(keepScroll = false) {
  const current = chat();
  const box = ui.messages;
  const follow = !keepScroll || state.shown !== current.id || box.scrollHeight - box.scrollTop - box.clientHeight < 80;
  ui.system.value = current.system || "";
  const actions = { busy: state.controller !== null, edit: startEdit, regenerate };
  state.live = renderMessages(box, current, actions);
  state.shown = current.id;
  if (follow) box.scrollTop = box.scrollHeight;
  renderSidebar();
}

function switchTo(id) {
  if (state.controller) stop();
  state.current = id;
  save();
  render();
  if (closeSidebar()) ui.prompt.focus(); // the drawer closed over the focused conversation
  clearError();
}

function startNewChat() {
  const empty = state.chats.find((c) => !c.messages.length);
  const fresh = empty || store.newChat();
  if (!empty) state.chats.unshift(fresh);
  switchTo(fresh.id);
  ui.prompt.focus();
}

function deleteChat(id) {
  const hadFocus = ui.chatList.contains(document.activeElement);
  if (id === state.current && state.controller) stop();
  state.chats = state.chats.filter((c) => c.id !== id);
  if (!state.chats.length) state.chats.push(store.newChat());
  if (!state.chats.some((c) => c.id === state.current)) state.current = state.chats[0].id;
  save();
  render();
  if (hadFocus && focusLost()) ui.chatList.querySelector("[aria-current]").focus();
}

// ---- sending and streaming ----------------------------------------------------------------------

function request(current) {
  const messages = current.messages.map((m) => ({ role: m.role, content: m.content }));
  if (current.system.trim()) messages.unshift({ role: "system", content: current.system });
  const body = { model: ui.model.value, messages, temperature: state.settings.temperature,
    top_p: state.settings.top_p };
  if (state.settings.max_tokens) body.max_tokens = state.settings.max_tokens;
  return body;
}

function setBusy(busy) {
  ui.send.hidden = busy;
  ui.stop.hidden = !busy;
  ui.messages.setAttribute("aria-busy", busy ? "true" : "false");
}

/** After the page changed under the keyboard (Send or Stop hidden, a button re-rendered away): Stop while a
 * reply streams, else the message box. */
function refocus() {
  if (!focusLost()) return;
  if (state.controller) ui.stop.focus();
  else ui.prompt.focus();
}

/** Ask for a reply to the conversation as it is now, streaming it into a new assistant message. */
async function reply() {
  const current = chat();
  if (!ui.model.value) {
    showError(ui.modelNote.textContent === "no model is served"
      ? "No model to answer: the server lists none (GET /v1/models is empty); check its model registry."
      : "No model selected: the model list did not load (check the API key under Settings, then reload).");
    return;
  }
  clearError();
  const body = request(current);
  const message = { role: "assistant", content: "", stats: null };
  current.messages.push(message);
  const controller = new AbortController();
  state.controller = controller;
  setBusy(true);
  render();
  refocus();
  const started = performance.now();
  let first = null;
  let last = null;
  let chunks = 0;
  const reads = new Set();
  let ended = "";
  let usage = null;
  try {
    const result = await streamChat(body, {
      key: ui.apiKey.value.trim(), signal: controller.signal,
      onDelta: (text, read) => {
        last = performance.now();
        if (first === null) first = last;
        chunks += 1;
        reads.add(read);
        message.content += text;
        showLive(current, message);
      },
    });
    usage = result.usage;
    if (result.finish_reason === "length") ended = "stopped at max tokens";
  } catch (err) {
    if (err.name === "AbortError") ended = "stopped";
    else {
      ended = "failed";
      showError(err instanceof ApiError ? err.message : `Unexpected error: ${err.message}`);
      if (err.status === 401) openSettings(ui.apiKey);
    }
  }
  const end = usage ? performance.now() : last ?? performance.now();
  if (!message.content && ended === "failed") current.messages.pop();
  else message.stats = stats({ started, first, end, usage, chunks, reads: reads.size, ended });
  current.updated = Date.now();
  if (state.controller === controller) state.controller = null;
  setBusy(state.controller !== null);
  save();
  render(true);
  refocus();
}

/** Show the growing reply at most once per frame (many pieces can arrive per frame), if it is on screen. */
function showLive(current, message) {
  if (state.frame) return;
  state.frame = requestAnimationFrame(() => {
    state.frame = 0;
    const shown = chat() === current && current.messages[current.messages.length - 1] === message;
    if (!state.live || !shown || message.stats) return; // switched away, or already final
    const box = ui.messages;
    const atBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 80;
    renderContent(state.live, message.content);
    if (atBottom) box.scrollTop = box.scrollHeight;
  });
}

// A reply whose pieces reached the page in fewer network reads than this came in a burst (a fast model, or
// pieces the network joined): their arrival times say nothing about the model's speed.
const MIN_READS = 3;

/** A reply's statistics; without the server's usage (after Stop) the streamed pieces are counted instead. */
function stats({ started, first, end, usage, chunks, reads, ended }) {
  const out = { ttft: first === null ? null : Math.round(first - started), ended: ended || null };
  const seconds = (end - (first ?? started)) / 1000;
  const burst = reads < MIN_READS || !(seconds > 0);
  if (usage) {
    out.tokens = usage.completion_tokens;
    if (burst && out.tokens > 0 && end > started) { // at least this fast: every token within the whole request's time
      out.tokensPerSecond = out.tokens / ((end - started) / 1000);
      out.atLeast = true;
    } else if (out.tokens > 1) out.tokensPerSecond = (out.tokens - 1) / seconds;
  } else if (chunks) {
    out.chunks = chunks;
    if (chunks > 1 && !burst) out.chunksPerSecond = (chunks - 1) / seconds;
  }
  return out;
}

function send() {
  const text = ui.prompt.value;
  if (!text.trim() || state.controller) return;
  const current = chat();
  current.messages.push({ role: "user", content: text });
  if (current.title === "New chat") current.title = text.trim().replace(/\s+/g, " ").slice(0, 48);
  ui.prompt.value = "";
  reply();
}

function stop() {
  if (state.controller) state.controller.abort();
}

function regenerate() {
  if (state.controller) return; // one reply at a time
  const current = chat();
  while (current.messages.length && current.messages[current.messages.length - 1].role === "assistant") {
    current.messages.pop();
  }
  if (current.messages.length) reply();
}

function startEdit(i) {
  openEditor(ui.messages, chat(), i, (text) => {
    const current = chat();
    current.messages.splice(i); // the edited message and everything after it are replaced
    current.messages.push({ role: "user", content: text });
    if (i === 0) current.title = text.trim().replace(/\s+/g, " ").slice(0, 48);
    reply();
  }, render);
}

// ---- layout and keyboard ------------------------------------------------------------------------

/** Close the phone-size drawer; true when it held the focus (the caller puts it somewhere visible). */
function closeSidebar() {
  const wasOpen = ui.layout.classList.contains("sidebar-open");
  ui.layout.classList.remove("sidebar-open");
  ui.toggleSidebar.setAttribute("aria-expanded", "false");
  return wasOpen && ui.sidebar.contains(document.activeElement);
}

function openSettings(focus) {
  ui.settings.hidden = false;
  ui.toggleSettings.setAttribute("aria-expanded", "true");
  if (focus) focus.focus();
}

function toggle(button, apply) {
  const open = button.getAttribute("aria-expanded") !== "true";
  button.setAttribute("aria-expanded", String(open));
  apply(open);
}

function wire() {
  for (const [name, id] of Object.entries({ layout: "layout", chatList: "chat-list", messages: "messages",
    model: "model", modelNote: "model-note", apiKey: "api-key", system: "system", temperature: "temperature",
    temperatureValue: "temperature-value", topP: "top-p", topPValue: "top-p-value", maxTokens: "max-tokens",
    prompt: "prompt", send: "send", stop: "stop", alert: "alert", alertText: "alert-text",
    sidebar: "sidebar", toggleSidebar: "toggle-sidebar", toggleSettings: "toggle-settings", settings: "settings" })) {
    ui[name] = $(id);
  }
  $("composer").addEventListener("submit", (event) => { event.preventDefault(); send(); });
  ui.settings.addEventListener("submit", (event) => event.preventDefault());
  ui.prompt.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      send();
    }
  });
  document.addEventListener("keydown", (event) => {
    if (event.key !== "Escape") return;
    if (!ui.layout.classList.contains("sidebar-open")) stop();
    else if (closeSidebar()) ui.toggleSidebar.focus();
  });
  $("close-sidebar").addEventListener("click", () => { closeSidebar(); ui.toggleSidebar.focus(); });
  ui.stop.addEventListener("click", stop);
  $("new-chat").addEventListener("click", startNewChat);
  $("alert-close").addEventListener("click", clearError);
  for (const input of [ui.model, ui.temperature, ui.topP, ui.maxTokens]) input.addEventListener("input", readSettings);
  ui.apiKey.addEventListener("change", () => { store.saveKey(ui.apiKey.value.trim()); loadModels(); });
  ui.system.addEventListener("input", () => { chat().system = ui.system.value; chat().updated = Date.now(); save(); });
  ui.toggleSidebar.addEventListener("click", () => toggle(ui.toggleSidebar, (open) => {
    ui.layout.classList.toggle("sidebar-open", open);
    if (open) (ui.chatList.querySelector("[aria-current]") || $("new-chat")).focus(); // into the drawer
  }));
  ui.toggleSettings.addEventListener("click",
    () => toggle(ui.toggleSettings, (open) => { ui.settings.hidden = !open; }));
}

function start() {
  wire();
  showSettings();
  state.chats = store.loadChats();
  if (!state.chats.length) state.chats.push(store.newChat());
  const last = store.loadCurrentId();
  state.current = state.chats.some((c) => c.id === last) ? last : state.chats[0].id;
  render();
  loadModels();
  ui.prompt.focus();
}

start();
