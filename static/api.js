// Talking to the service: the token, JSON calls, and server-sent events read with fetch().
// fetch(), not EventSource: EventSource cannot send the Authorization header.

const TOKEN_KEY = "chat-token";

export class ApiError extends Error {
  constructor(status, type, detail, body = {}, retryAfter = null) {
    super(typeof detail === "string" ? detail : JSON.stringify(detail));
    this.status = status;
    this.type = type;
    this.detail = detail;
    this.body = body;
    this.retryAfter = retryAfter;
  }
}

// askToken(refused: bool) -> Promise<string>: set by the page; shows the token dialog.
let askToken = null;
let asking = null;

export function onTokenNeeded(callback) {
  askToken = callback;
}

function token() {
  return sessionStorage.getItem(TOKEN_KEY);
}

function headers(extra = {}) {
  const out = { ...extra };
  const t = token();
  if (t) out.Authorization = `Bearer ${t}`;
  return out;
}

async function newToken() {
  // One dialog however many calls were refused at once.
  if (!asking) {
    const refused = token() !== null;
    asking = askToken(refused).then((t) => {
      sessionStorage.setItem(TOKEN_KEY, t);
      asking = null;
      return t;
    });
  }
  return asking;
}

async function errorFrom(response) {
  let body = {};
  try {
    body = await response.json();
  } catch {
    body = { detail: `${response.status} ${response.statusText}`, type: "http_error" };
  }
  return new ApiError(
    response.status,
    body.type || "http_error",
    body.detail ?? `${response.status}`,
    body,
    response.headers.get("Retry-After"),
  );
}

// fetch with the token; a 401 asks for the token (again) and retries.
export async function request(path, options = {}) {
  for (;;) {
    const init = { ...options, headers: headers(options.headers) };
    let response;
    try {
      response = await fetch(path, init);
    } catch (err) {
      if (err.name === "AbortError") throw err;
      throw new ApiError(0, "network_error", "cannot reach the service; is it still running?");
    }
    if (response.status === 401 && askToken) {
      await newToken();
      continue;
    }
    if (!response.ok) throw await errorFrom(response);
    return response;
  }
}

export async function api(path, { method = "GET", body, signal } = {}) {
  const options = { method, signal };
  if (body !== undefined) {
    options.body = JSON.stringify(body);
    options.headers = { "Content-Type": "application/json" };
  }
  const response = await request(path, options);
  if (response.status === 204) return null;
  return response.json();
}

// POST (or GET) a streaming call; calls onEvent(name, data, id) per event until the stream ends.
// Resolves with the last event id seen (null if none).
export async function stream(path, { body, signal, lastEventId = null, onEvent }) {
  const options = { method: body === undefined ? "GET" : "POST", signal, headers: {} };
  if (body !== undefined) {
    options.body = JSON.stringify(body);
    options.headers["Content-Type"] = "application/json";
  }
  if (lastEventId !== null) options.headers["Last-Event-ID"] = String(lastEventId);
  const response = await request(path, options);
  const type = response.headers.get("Content-Type") || "";
  if (!type.startsWith("text/event-stream")) {
    // a JSON answer (e.g. a stream that had already ended): hand it over as `done`
    onEvent("done", { message: (await response.json()).message }, null);
    return lastEventId;
  }
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let last = lastEventId;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value.replace(/\r\n?/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const event = parseEvent(block);
      if (event === null) continue;
      if (event.id !== null) last = event.id;
      onEvent(event.name, event.data, last);
    }
  }
  return last;
}

function parseEvent(block) {
  let name = "message";
  let id = null;
  const data = [];
  for (const line of block.split("\n")) {
    if (!line || line.startsWith(":")) continue;
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "event") name = value;
    else if (field === "data") data.push(value);
    else if (field === "id") id = value;
  }
  if (!data.length) return null;
  return { name, id, data: JSON.parse(data.join("\n")) };
}

// Download a response as a file (export), keeping the token out of any URL.
export async function download(path, fallbackName) {
  const response = await request(path);
  const disposition = response.headers.get("Content-Disposition") || "";
  const blob = await response.blob();
  const link = document.createElement("a");
  link.href = URL.createObjectURL(blob);
  link.download = fileName(disposition) || fallbackName;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(link.href), 10_000);
  return link.download;
}

function fileName(disposition) {
  const star = /filename\*=UTF-8''([^;]+)/i.exec(disposition);
  if (star) {
    try {
      return decodeURIComponent(star[1]);
    } catch {
      // fall through to the plain name
    }
  }
  const plain = /filename="?([^";]+)"?/i.exec(disposition);
  return plain ? plain[1] : null;
}

// Which optional endpoints and fields this server has, from its own OpenAPI document
// (open without the token). Features of other releases hide themselves when absent.
export async function capabilities() {
  const caps = { paths: new Set(), chatFields: new Set(), patchFields: new Set() };
  try {
    const response = await fetch("/openapi.json");
    if (!response.ok) return caps;
    const doc = await response.json();
    caps.paths = new Set(Object.keys(doc.paths || {}));
    const schemas = (doc.components && doc.components.schemas) || {};
    caps.chatFields = new Set(Object.keys((schemas.ChatIn && schemas.ChatIn.properties) || {}));
    caps.patchFields = new Set(Object.keys((schemas.ConversationPatch && schemas.ConversationPatch.properties) || {}));
  } catch {
    // no document: the page offers what every release has
  }
  const has = (re) => [...caps.paths].some((p) => re.test(p));
  caps.regenerate = has(/^\/api\/conversations\/\{[^}]+\}\/messages\/\{[^}]+\}\/regenerate$/);
  caps.edit = has(/^\/api\/conversations\/\{[^}]+\}\/messages\/\{[^}]+\}\/edit$/);
  caps.stop = has(/^\/api\/conversations\/\{[^}]+\}\/messages\/\{[^}]+\}\/stop$/);
  caps.reattach = has(/^\/api\/conversations\/\{[^}]+\}\/messages\/\{[^}]+\}\/stream$/);
  caps.search = caps.paths.has("/api/search");
  caps.exportOne = has(/^\/api\/conversations\/\{[^}]+\}\/export$/);
  caps.exportAll = caps.paths.has("/api/export");
  caps.import = caps.paths.has("/api/import");
  caps.switchBranch = caps.patchFields.has("current_id");
  caps.onDisconnect = caps.chatFields.has("on_disconnect");
  caps.clientMessageId = caps.chatFields.has("client_message_id");
  return caps;
}
