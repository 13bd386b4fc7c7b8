// The server's OpenAI API: the model list, and streamed chat completions parsed from server-sent events.

/** An API failure, with a message written for the person at the page. */
export class ApiError extends Error {
  constructor(message, { status = 0, code = null } = {}) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

function headers(key, json) {
  const out = {};
  if (key) out.Authorization = `Bearer ${key}`;
  if (json) out["Content-Type"] = "application/json";
  return out;
}

/** What to tell the user about an error body {"error": {message, code, ...}} with an HTTP status. */
export function explain(status, error, retryAfter) {
  const message = (error && error.message) || `The server answered ${status}.`;
  const code = error && error.code;
  const retry = retryAfter ? ` Retry in ${retryAfter} s.` : "";
  if (status === 401 || code === "invalid_api_key") {
    return `Wrong or missing API key: enter a key of this server under Settings. (${message})`;
  }
  if (code === "queue_full" || code === "queue_timeout") return `The model is busy: ${message}${retry}`;
  if (code === "context_length_exceeded") {
    return `The conversation is too long for the model: ${message} Start a new chat, shorten the ` +
      "message or lower Max tokens.";
  }
  if (code === "model_unavailable" || code === "model_not_found") return `Model unavailable: ${message}${retry}`;
  if (code === "server_shutting_down") return `The server is shutting down: ${message}`;
  const what = [status ? `Error ${status}` : "Error", code ? `(${code})` : ""].filter(Boolean).join(" ");
  return `${what}: ${message}`;
}

async function failure(response) {
  let error = null;
  try {
    error = (await response.json()).error;
  } catch {
    // not JSON: explain() falls back to the status
  }
  return new ApiError(explain(response.status, error, response.headers.get("Retry-After")),
    { status: response.status, code: error && error.code });
}

async function call(url, init) {
  try {
    return await fetch(url, init);
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new ApiError("Cannot reach the server (network error): check that it is running and reachable.");
  }
}

/** The ids of the models the server can serve now. */
export async function listModels(key) {
  const response = await call("v1/models", { headers: headers(key, false) });
  if (!response.ok) throw await failure(response);
  let body;
  try {
    body = await response.json();
  } catch {
    throw new ApiError("The server's model list (GET /v1/models) is not JSON: is this the right server?");
  }
  const data = body && Array.isArray(body.data) ? body.data : [];
  return data.map((m) => m && m.id).filter((id) => typeof id === "string" && id);
}

/** Yield [payload, read] for each parsed `data:` payload of an SSE body, `read` numbering the network reads
 * (payloads of one read arrived together); "[DONE]" ends it, a body that ends without it is a reply cut off
 * (the connection closed early: a proxy, a crash), never taken for a complete one. */
async function* events(body) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (let read = 1; ; read++) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.search(/\r?\n\r?\n/)) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end).replace(/^\r?\n\r?\n/, "");
      const data = block.split(/\r?\n/).filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart());
      if (!data.length) continue; // a comment (keep-alive ping)
      const text = data.join("\n");
      if (text === "[DONE]") return;
      yield [JSON.parse(text), read];
    }
  }
  throw new ApiError("The reply was cut off: the connection to the server closed before the reply ended.");
}

/**
 * Stream a chat completion: onDelta(text, read) for each piece of the reply (`read`: which network read
 * brought it); resolves with
 * {usage, finish_reason}. Aborting `signal` closes the connection, which stops the generation on the server.
 */
export async function streamChat(request, { key, signal, onDelta }) {
  const body = { ...request, stream: true, stream_options: { include_usage: true } };
  const response = await call("v1/chat/completions",
    { method: "POST", headers: headers(key, true), body: JSON.stringify(body), signal });
  if (!response.ok) throw await failure(response);
  let usage = null;
  let finish = null;
  try {
    for await (const [event, read] of events(response.body)) {
      if (event.error) {
        throw new ApiError(explain(0, event.error, null), { code: event.error.code }); // ended mid-reply
      }
      if (event.usage) usage = event.usage;
      for (const choice of event.choices || []) {
        if (choice.delta && choice.delta.content) onDelta(choice.delta.content, read);
        if (choice.finish_reason) finish = choice.finish_reason;
      }
    }
  } catch (err) {
    if (err instanceof ApiError || err.name === "AbortError") throw err;
    throw new ApiError("The connection to the server broke during the reply (network error).");
  }
  return { usage, finish_reason: finish };
}
