// Message text to DOM nodes, safely: only text nodes and elements made here (never innerHTML).
// Fenced ``` blocks become <pre><code> with a copy button; `inline code` becomes <code>.

/** Copy text to the clipboard (with a fallback where the Clipboard API is not available). */
export async function copyText(text) {
  if (navigator.clipboard && window.isSecureContext) {
    await navigator.clipboard.writeText(text);
    return;
  }
  const area = document.createElement("textarea");
  area.value = text;
  area.setAttribute("readonly", "");
  area.className = "offscreen";
  document.body.append(area);
  area.select();
  document.execCommand("copy");
  area.remove();
}

/** A button that copies `text()` and says so. */
export function copyButton(label, text) {
  const button = el("button", "copy", "Copy");
  button.type = "button";
  button.setAttribute("aria-label", label);
  button.addEventListener("click", async () => {
    try {
      await copyText(text());
      button.textContent = "Copied";
    } catch {
      button.textContent = "Copy failed";
    }
    setTimeout(() => { button.textContent = "Copy"; }, 1500);
  });
  return button;
}

/** An element with a class and text content. */
export function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

/** Split text into [{kind: "text"|"code", text, lang}] at fenced code blocks (an open fence runs to the end). */
export function splitFences(text) {
  const parts = [];
  const fence = /^[ \t]*```[ \t]*([\w+#.-]*)[^\n]*\n?/gm;
  let at = 0;
  let open = null;
  for (let m = fence.exec(text); m; m = fence.exec(text)) {
    if (open === null) {
      if (m.index > at) parts.push({ kind: "text", text: text.slice(at, m.index) });
      open = { lang: m[1], start: m.index + m[0].length };
    } else {
      parts.push({ kind: "code", lang: open.lang, text: text.slice(open.start, m.index).replace(/\n$/, "") });
      open = null;
    }
    at = m.index + m[0].length;
  }
  if (open !== null) parts.push({ kind: "code", lang: open.lang, text: text.slice(open.start) });
  else if (at < text.length) parts.push({ kind: "text", text: text.slice(at) });
  return parts;
}

function inline(text) {
  const p = el("p", "text");
  const pieces = text.split(/(`[^`\n]+`)/);
  for (const piece of pieces) {
    if (piece.length > 2 && piece.startsWith("`") && piece.endsWith("`")) p.append(el("code", "inline", piece.slice(1, -1)));
    else if (piece) p.append(document.createTextNode(piece));
  }
  return p;
}

function codeBlock(part) {
  const box = el("div", "code-block");
  const bar = el("div", "code-bar");
  bar.append(el("span", "code-lang", part.lang || "code"), copyButton("Copy code", () => part.text));
  const pre = el("pre");
  pre.tabIndex = 0; // scrollable with the keyboard
  pre.append(el("code", part.lang ? `language-${part.lang}` : "", part.text));
  box.append(bar, pre);
  return box;
}

// What each rendered node shows, block by block ({key, el}): a re-render (every frame of a streaming reply)
// keeps the blocks whose text did not change, so the cost is that of the growing end, not of the whole reply,
// and a focused or "Copied" button in an earlier code block stays as it is.
const shown = new WeakMap();

function blocks(text) {
  const out = [];
  for (const part of splitFences(text)) {
    if (part.kind === "code") out.push({ key: `code ${part.lang}\n${part.text}`, make: () => codeBlock(part) });
    else {
      for (const para of part.text.split(/\n{2,}/)) {
        if (!para.trim()) continue;
        const clean = para.replace(/^\n+|\n+$/g, "");
        out.push({ key: `text\n${clean}`, make: () => inline(clean) });
      }
    }
  }
  return out;
}

/** Make the children of `node` the rendered message text (re-using the blocks that did not change). */
export function renderContent(node, text) {
  const before = shown.get(node) || [];
  const after = blocks(text).map((b, i) => {
    const old = before[i];
    return old && old.key === b.key && old.el.parentNode === node ? old : { key: b.key, el: b.make() };
  });
  after.forEach((b, i) => {
    if (node.children[i] !== b.el) node.insertBefore(b.el, node.children[i] || null);
  });
  while (node.children.length > after.length) node.lastElementChild.remove();
  shown.set(node, after);
}
