// The browser's storage: settings, the API key and the conversations (localStorage, this origin only).

const KEYS = { chats: "g4j.chats", current: "g4j.current", settings: "g4j.settings", apiKey: "g4j.apiKey" };

function read(key, fallback) {
  try {
    const text = localStorage.getItem(key);
    return text === null ? fallback : JSON.parse(text);
  } catch {
    return fallback;
  }
}

/** Store a value; false when the browser refused it (storage full or disabled). */
function write(key, value) {
  try {
    localStorage.setItem(key, JSON.stringify(value));
    return true;
  } catch {
    return false; // the page keeps working for this visit
  }
}

/** The saved API key ("" if none). */
export function loadKey() {
  const key = read(KEYS.apiKey, "");
  return typeof key === "string" ? key : "";
}

/** Save the API key (an empty one is removed). */
export function saveKey(key) {
  if (key) write(KEYS.apiKey, key);
  else {
    try {
      localStorage.removeItem(KEYS.apiKey);
    } catch {
      // storage disabled: nothing was kept
    }
  }
}

/** Saved generation settings: model, temperature, top_p, max_tokens. */
export function loadSettings() {
  const saved = read(KEYS.settings, {});
  const ok = (v, lo, hi) => typeof v === "number" && v >= lo && v <= hi;
  const s = saved && typeof saved === "object" ? saved : {};
  return {
    model: typeof s.model === "string" ? s.model : "",
    temperature: ok(s.temperature, 0, 2) ? s.temperature : 0.7,
    top_p: ok(s.top_p, 0, 1) ? s.top_p : 0.95,
    max_tokens: s.max_tokens === null || (Number.isInteger(s.max_tokens) && s.max_tokens > 0) ? s.max_tokens : 512,
  };
}

/** Save the generation settings. */
export function saveSettings(settings) {
  write(KEYS.settings, settings);
}

/** A new empty conversation. */
export function newChat() {
  const id = `c${Date.now().toString(36)}${Math.random().toString(36).slice(2, 7)}`;
  return { id, title: "New chat", system: "", messages: [], updated: Date.now() };
}

function cleanMessage(m) {
  if (!m || (m.role !== "user" && m.role !== "assistant") || typeof m.content !== "string") return null;
  const stats = m.stats && typeof m.stats === "object" ? m.stats : null;
  return m.role === "user" ? { role: m.role, content: m.content } : { role: m.role, content: m.content, stats };
}

/** A stored conversation in the shape the page uses, or null when nothing usable is left of it. */
export function cleanChat(c) {
  if (!c || typeof c !== "object" || typeof c.id !== "string" || !c.id || !Array.isArray(c.messages)) return null;
  const title = typeof c.title === "string" && c.title.trim() ? c.title : "New chat";
  return { id: c.id, title, system: typeof c.system === "string" ? c.system : "",
    messages: c.messages.map(cleanMessage).filter(Boolean), updated: Number.isFinite(c.updated) ? c.updated : 0 };
}

/** Every saved conversation, newest first; what another version or a hand edit broke is dropped or mended. */
export function loadChats() {
  const chats = read(KEYS.chats, []);
  if (!Array.isArray(chats)) return [];
  const seen = new Set();
  return chats.map(cleanChat).filter((c) => c && !seen.has(c.id) && seen.add(c.id));
}

/** Save every conversation and which one is open; false when the browser's storage refused them. */
export function saveChats(chats, currentId) {
  return write(KEYS.chats, chats) && write(KEYS.current, currentId);
}

/** The id of the conversation that was open last. */
export function loadCurrentId() {
  return read(KEYS.current, null);
}
