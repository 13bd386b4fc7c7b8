// The conversation's messages as DOM: bubbles, their buttons, the live reply and its statistics.

import { copyButton, el, renderContent } from "./render.js";

function button(text, label, onClick, className = "small") {
  const b = el("button", className, text);
  b.type = "button";
  b.setAttribute("aria-label", label);
  b.addEventListener("click", onClick);
  return b;
}

const num = (v) => typeof v === "number" && Number.isFinite(v);

/**
 * The statistics line of a finished reply: time to first token, tokens/s, tokens, how it ended. After Stop
 * the server sends no usage, so the rate and count are those of the streamed pieces, marked "≈"; a reply
 * that arrived in one burst has a lower bound of its rate (over the whole request), marked "≥".
 */
export function statsText(stats) {
  if (!stats || typeof stats !== "object") return "";
  const parts = [];
  if (num(stats.ttft)) parts.push(`TTFT ${(stats.ttft / 1000).toFixed(2)} s`);
  const floor = stats.atLeast ? "≥ " : "";
  if (num(stats.tokensPerSecond)) parts.push(`${floor}${stats.tokensPerSecond.toFixed(1)} tokens/s`);
  if (num(stats.tokens)) parts.push(`${stats.tokens} tokens`);
  if (!num(stats.tokens) && num(stats.chunks)) {
    if (num(stats.chunksPerSecond)) parts.push(`≈ ${stats.chunksPerSecond.toFixed(1)} tokens/s`);
    parts.push(`≈ ${stats.chunks} tokens (pieces streamed)`);
  }
  if (typeof stats.ended === "string" && stats.ended) parts.push(stats.ended);
  return parts.join(" · ");
}

// Each message keeps its DOM node across renders (a WeakMap keyed by the message object): a render only
// touches what changed, so the conversation's live region announces the new reply, not the whole
// conversation again, and earlier messages keep their focus, selection and scroll state.
const nodes = new WeakMap();

/**
 * Render every message of `chat` into `container`; `actions` has edit(i), regenerate(), busy.
 * Returns the body node of the last message (the live reply while streaming).
 */
export function renderMessages(container, chat, actions) {
  if (!chat.messages.length) {
    container.replaceChildren(el("p", "empty", "Start a conversation: pick a model and type a message below."));
    return null;
  }
  const wanted = chat.messages.map((message, i) => update(chat, message, i, actions).node);
  wanted.forEach((node, i) => {
    if (container.children[i] !== node) container.insertBefore(node, container.children[i] || null);
  });
  while (container.children.length > wanted.length) container.lastElementChild.remove();
  return nodes.get(chat.messages[chat.messages.length - 1]).body;
}

function update(chat, message, i, actions) {
  let view = nodes.get(message);
  if (!view) {
    view = create(message);
    nodes.set(message, view);
  }
  view.node.dataset.index = String(i);
  const last = i === chat.messages.length - 1;
  const tools = [];
  if (!(actions.busy && last)) tools.push("copy");
  if (message.role === "user" && !actions.busy) tools.push("edit");
  if (last && !actions.busy) tools.push(message.role === "assistant" ? "regenerate" : "retry"); // after a failure
  const toolsKey = tools.join() + (tools.includes("edit") ? i : "");
  if (view.toolsKey !== toolsKey) {
    view.toolsKey = toolsKey;
    view.tools.replaceChildren(...tools.map((name) => tool(name, message, i, actions)));
  }
  if (view.content !== message.content) {
    view.content = message.content;
    renderContent(view.body, message.content);
  }
  if (view.stats) {
    const text = statsText(message.stats);
    if (view.stats.textContent !== text) view.stats.textContent = text;
  }
  return view;
}

function tool(name, message, i, actions) {
  if (name === "edit") return button("Edit", "Edit this message and send it again", () => actions.edit(i));
  if (name === "regenerate") return button("Regenerate", "Regenerate this reply", () => actions.regenerate());
  if (name === "retry") return button("Retry", "Send this message again", () => actions.regenerate());
  return copyButton(message.role === "user" ? "Copy message" : "Copy reply", () => message.content);
}

function create(message) {
  const who = message.role === "user" ? "You" : "Assistant";
  const node = el("article", `message ${message.role}`);
  node.setAttribute("aria-label", who);
  const head = el("div", "message-head");
  const tools = el("div", "message-tools");
  head.append(el("span", "who", who), tools);
  const body = el("div", "body");
  node.append(head, body);
  const stats = message.role === "assistant" ? el("p", "stats") : null;
  if (stats) node.append(stats);
  return { node, body, tools, stats, content: null, toolsKey: null };
}

/** Turn message i's bubble into an editor; onSave(text) replaces it and everything after it. */
export function openEditor(container, chat, i, onSave, onCancel) {
  const node = container.querySelector(`[data-index="${i}"]`);
  if (!node) return;
  const body = node.querySelector(".body");
  const view = nodes.get(chat.messages[i]);
  if (view) view.content = null; // the next render shows the text again (Cancel) or the new one (Save)
  const form = el("form", "editor");
  const label = el("label", "visually-hidden", "Edit the message");
  const area = el("textarea");
  area.id = `edit-${i}`;
  label.htmlFor = area.id;
  area.value = chat.messages[i].content;
  area.rows = Math.min(12, Math.max(2, area.value.split("\n").length));
  const save = el("button", "primary small", "Save & send");
  save.type = "submit";
  const cancel = button("Cancel", "Cancel editing", onCancel);
  form.append(label, area, el("div", "editor-buttons"));
  form.lastChild.append(save, cancel);
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    if (area.value.trim()) onSave(area.value);
  });
  area.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      form.requestSubmit();
    } else if (event.key === "Escape") {
      event.stopPropagation();
      onCancel();
    }
  });
  body.replaceChildren(form);
  area.focus();
}
