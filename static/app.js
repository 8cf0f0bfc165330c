// The chat page. Everything a conversation holds is untrusted text: it reaches the DOM through
// textContent, or through render.js (Markdown, sanitized); never through innerHTML directly.

import { api, capabilities, download, onTokenNeeded, request, stream } from "./api.js";
import { renderMarkdown } from "./render.js";

const $ = (id) => document.getElementById(id);
const PAGE_SIZE = 30;

const state = {
  caps: {}, // what this server offers beyond the basics (api.js capabilities()), once known
  models: null,
  conversation: null, // the open conversation as the API returned it, or null for a new chat
  draft: { model: null, system: null, temperature: null }, // settings of a chat not yet sent
  live: null, // the reply being streamed: {controller, conversationId, messageId, stopped}
  list: { cursor: null, done: false, loading: false, ids: new Set() },
  focusMessage: null, // a search hit to scroll to once its conversation is open
};

// --- errors the user can act on -----------------------------------------------------------------

const ERROR_TITLES = {
  provider_not_configured: "This provider is not configured",
  unknown_provider: "Unknown provider",
  model_not_found: "The provider does not know this model",
  rate_limited: "The provider is rate limiting",
  spend_limit_reached: "The provider account's spending limit is reached",
  budget_exceeded: "Budget reached",
  too_many_generations: "Too many replies at once",
  provider_unavailable: "The provider cannot be reached",
  provider_timeout: "The provider stopped answering",
  provider_auth_failed: "The provider refused the API key",
  provider_rejected: "The provider refused the request",
  provider_malformed_reply: "The provider sent an unreadable reply",
  context_too_long: "The message is too long for this model",
  server_shutdown: "The service was stopped",
  storage_full: "The disk is full",
  storage_error: "The reply could not be saved",
  conversation_not_found: "This conversation no longer exists",
  conversation_unreadable: "This conversation's file cannot be read",
  message_not_found: "This message no longer exists",
  body_too_large: "Too large",
  invalid_request: "The request was not accepted",
  network_error: "Cannot reach the service",
  unknown_import_format: "Not an export this service can read",
  nothing_to_import: "Nothing to import",
  invalid_query: "The search could not be understood",
  index_building: "Search is not ready yet",
};

function describe(err) {
  const type = err.type || "error";
  const detail = Array.isArray(err.detail)
    ? err.detail.map((e) => `${(e.loc || []).slice(1).join(".")}: ${e.msg}`).join("; ")
    : String(err.detail ?? err.message ?? "");
  const parts = [`${ERROR_TITLES[type] || "Something went wrong"}: ${detail}`];
  if (type === "rate_limited" || type === "too_many_generations" || type === "index_building") {
    parts.push(err.retryAfter ? `Try again in ${err.retryAfter} s.` : "Try again shortly.");
  }
  if (type === "budget_exceeded" && err.body && err.body.resets_at) {
    parts.push(`It resets at ${new Date(err.body.resets_at).toLocaleString()}.`);
  }
  return { type, text: parts.join(" ") };
}

function showNotice(err) {
  const { type, text } = describe(err);
  const notice = $("notice");
  notice.replaceChildren();
  const message = document.createElement("span");
  message.textContent = text;
  const close = document.createElement("button");
  close.type = "button";
  close.className = "icon";
  close.setAttribute("aria-label", "Dismiss");
  close.textContent = "\u2715";
  close.addEventListener("click", hideNotice);
  notice.append(message, close);
  notice.dataset.type = type;
  notice.hidden = false;
}

function hideNotice() {
  $("notice").hidden = true;
}

// --- token mode ----------------------------------------------------------------------------------

onTokenNeeded(
  (refused) =>
    new Promise((resolve) => {
      const dialog = $("token-dialog");
      $("token-message").textContent = refused
        ? "That token was refused. Enter the service's token (CHAT_API_TOKEN)."
        : "This service needs its token (CHAT_API_TOKEN). It is kept for this browser tab only.";
      dialog.classList.toggle("refused", refused);
      $("token-input").value = "";
      $("token-form").onsubmit = (event) => {
        event.preventDefault();
        const value = $("token-input").value.trim();
        if (!value) return;
        dialog.close();
        resolve(value);
      };
      dialog.oncancel = (event) => event.preventDefault(); // nothing works without it
      dialog.showModal();
      $("token-input").focus();
    }),
);

// --- models --------------------------------------------------------------------------------------

async function loadModels() {
  state.models = await api("/api/models");
  state.draft.model = state.draft.model || state.models.default_model;
  fillModelPicker();
}

function fillModelPicker() {
  if (!state.models) return; // still being listed; loadModels fills it
  const select = $("model");
  const current = state.conversation ? state.conversation.model : state.draft.model;
  select.replaceChildren();
  const seen = new Set();
  const hints = [];
  for (const provider of state.models.providers) {
    const group = document.createElement("optgroup");
    if (!provider.configured) {
      group.label = `${provider.name}: ${provider.hint}`;
      const option = new Option(`${provider.name}: ${provider.hint}`, "");
      option.disabled = true;
      group.append(option);
      hints.push(`${provider.name}: ${provider.hint}`);
    } else {
      group.label = provider.name;
      for (const model of provider.models) {
        const name = `${provider.name}/${model}`;
        seen.add(name);
        group.append(new Option(name, name));
      }
    }
    select.append(group);
  }
  if (current && !seen.has(current)) select.prepend(new Option(current, current));
  select.value = current || "";
  $("model-hint").textContent = hints.length ? `Not configured: ${hints.join("; ")}` : "";
}

async function changeModel() {
  const model = $("model").value;
  if (!model) return;
  if (!state.conversation) {
    state.draft.model = model;
    return;
  }
  try {
    state.conversation = await api(`/api/conversations/${state.conversation.id}`, {
      method: "PATCH",
      body: { model },
    });
    hideNotice();
  } catch (err) {
    showNotice(err);
    fillModelPicker();
  }
}

// --- the conversation list ----------------------------------------------------------------------

function resetList() {
  state.list = { cursor: null, done: false, loading: false, ids: new Set() };
  $("conversations").replaceChildren();
  return loadMore();
}

async function loadMore() {
  const list = state.list;
  if (list.loading || list.done) return;
  list.loading = true;
  try {
    const query = new URLSearchParams({ limit: String(PAGE_SIZE) });
    if (list.cursor) query.set("cursor", list.cursor);
    const page = await api(`/api/conversations?${query}`);
    if (list !== state.list) return; // the list was reset meanwhile
    for (const item of page.items) {
      if (list.ids.has(item.id)) continue;
      list.ids.add(item.id);
      $("conversations").append(listItem(item));
    }
    list.cursor = page.next_cursor;
    list.done = !page.next_cursor;
    $("list-end").textContent = list.done && list.ids.size === 0 ? "No conversations yet." : "";
  } catch (err) {
    showNotice(err);
    list.done = true;
  } finally {
    list.loading = false;
  }
  if (!list.done && sentinelVisible()) loadMore();
}

function sentinelVisible() {
  const sidebar = $("sidebar").getBoundingClientRect();
  return $("list-end").getBoundingClientRect().top <= sidebar.bottom + 200;
}

function listItem(item) {
  const li = document.createElement("li");
  li.dataset.id = item.id;
  const link = document.createElement("a");
  link.href = `#c=${item.id}`;
  link.textContent = item.title || "Untitled";
  link.title = item.title || "";
  if (state.conversation && state.conversation.id === item.id) link.setAttribute("aria-current", "page");
  li.append(link);
  return li;
}

function markCurrentInList() {
  for (const link of $("conversations").querySelectorAll("a")) {
    const on = state.conversation && link.parentElement.dataset.id === state.conversation.id;
    if (on) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
}

// --- opening a conversation ----------------------------------------------------------------------

function routeFromHash() {
  const match = /^#c=([0-9a-f]{32})$/.exec(location.hash);
  if (match) return openConversation(match[1]);
  newChat({ keepHash: true });
  return Promise.resolve();
}

async function openConversation(id) {
  if (state.live) return;
  try {
    const conversation = await api(`/api/conversations/${id}`);
    showConversation(conversation);
    closeSidebarOnNarrow();
    const generating = conversation.messages.find((m) => m.status === "generating");
    if (generating && state.caps.reattach) reattach(conversation.id, generating.id);
  } catch (err) {
    showNotice(err);
    if (err.type === "conversation_not_found") newChat();
  }
}

function showConversation(conversation) {
  state.conversation = conversation;
  hideNotice();
  showHeader();
  fillSettings();
  fillModelPicker();
  renderMessages(conversation.messages);
  markCurrentInList();
  if (state.focusMessage) {
    const target = document.getElementById(`m-${state.focusMessage}`);
    state.focusMessage = null;
    if (target) {
      target.scrollIntoView({ block: "center" });
      target.classList.add("flash");
    }
  } else {
    scrollToEnd();
  }
}

function newChat({ keepHash = false } = {}) {
  if (state.live) return;
  state.conversation = null;
  state.draft = { model: state.models ? state.models.default_model : null, system: null, temperature: null };
  if (!keepHash && location.hash) history.pushState(null, "", location.pathname);
  hideNotice();
  showHeader();
  fillSettings();
  if (state.models) fillModelPicker();
  renderMessages([]);
  markCurrentInList();
  closeSidebarOnNarrow();
  $("input").focus();
}

function showHeader() {
  const conversation = state.conversation;
  $("title").textContent = conversation ? conversation.title || "Untitled" : "New chat";
  document.title = conversation ? `${conversation.title || "Untitled"} - Chat` : "Chat";
  $("rename").hidden = !conversation;
  $("delete").hidden = !conversation;
  $("export-one").hidden = !conversation || !state.caps.exportOne;
  showTotals();
}

function showTotals() {
  const conversation = state.conversation;
  let input = 0;
  let output = 0;
  let cost = null;
  if (conversation) {
    for (const m of conversation.messages) {
      if (m.usage) {
        input += m.usage.input_tokens || 0;
        output += m.usage.output_tokens || 0;
      }
      if (typeof m.cost === "number") cost = (cost || 0) + m.cost;
    }
    const totals = conversation.totals; // the server's totals over every branch, where it keeps them
    if (totals) {
      input = totals.input_tokens || 0;
      output = totals.output_tokens || 0;
      cost = typeof totals.cost === "number" ? totals.cost : cost;
    }
  }
  const parts = [];
  if (input || output) parts.push(`${input + output} tokens`);
  if (cost !== null) parts.push(formatCost(cost));
  $("totals").textContent = parts.join(" \u00b7 ");
}

function formatCost(cost) {
  return `$${cost < 0.01 && cost > 0 ? cost.toPrecision(2) : cost.toFixed(2)}`;
}

function fillSettings() {
  const source = state.conversation
    ? { system: state.conversation.system, temperature: state.conversation.params.temperature }
    : state.draft;
  $("system").value = source.system || "";
  $("temperature").value = source.temperature ?? "";
  $("settings-status").textContent = "";
}

async function saveSettings() {
  const system = $("system").value.trim() ? $("system").value : null;
  const raw = $("temperature").value.trim();
  const temperature = raw === "" ? null : Number(raw);
  if (temperature !== null && !(temperature >= 0 && temperature <= 2)) {
    $("settings-status").textContent = "Temperature is a number from 0 to 2.";
    return;
  }
  if (!state.conversation) {
    Object.assign(state.draft, { system, temperature });
    $("settings-status").textContent = "Saved for this new chat.";
    return;
  }
  const params = { temperature, max_tokens: state.conversation.params.max_tokens ?? null };
  try {
    state.conversation = await api(`/api/conversations/${state.conversation.id}`, {
      method: "PATCH",
      body: { system, params },
    });
    $("settings-status").textContent = "Saved.";
  } catch (err) {
    showNotice(err);
  }
}

// --- messages ------------------------------------------------------------------------------------

function renderMessages(messages) {
  const fragment = document.createDocumentFragment();
  for (const m of messages) fragment.append(messageElement(m));
  $("messages").replaceChildren(fragment);
  $("empty").hidden = messages.length > 0;
}

function messageElement(m) {
  const li = document.createElement("li");
  li.className = `msg ${m.role}`;
  if (m.id) li.id = `m-${m.id}`;
  li.dataset.id = m.id || "";
  const body = document.createElement("div");
  body.className = "content";
  li.append(body);
  fillMessage(li, m);
  return li;
}

function fillMessage(li, m) {
  li.dataset.status = m.status || "";
  const body = li.querySelector(".content");
  if (m.role === "user") body.textContent = m.content;
  else renderMarkdown(body, m.content || "");
  li.querySelector(".meta")?.remove();
  li.querySelector(".msg-error")?.remove();
  if (m.error) {
    const problem = document.createElement("p");
    problem.className = "msg-error";
    problem.textContent = describe({ type: m.error.type, detail: m.error.message }).text;
    li.append(problem);
  }
  li.append(metaLine(m));
}

function metaLine(m) {
  const meta = document.createElement("div");
  meta.className = "meta";
  if (state.caps.switchBranch && m.sibling_ids && m.sibling_ids.length > 1) meta.append(versionSwitch(m));
  const facts = [];
  if (m.role === "assistant") {
    if (m.model) facts.push(m.model);
    if (m.usage && (m.usage.input_tokens !== null || m.usage.output_tokens !== null)) {
      const about = m.usage.estimated ? "\u2248" : ""; // counted by the service's estimate
      facts.push(`${about}${m.usage.input_tokens ?? "?"} in / ${m.usage.output_tokens ?? "?"} out tokens`);
    }
    if (typeof m.cost === "number") facts.push(formatCost(m.cost));
    if (m.status === "incomplete") facts.push(m.finish_reason === "stopped" ? "stopped" : "incomplete");
    if (m.status === "generating") facts.push("writing\u2026");
  }
  const text = document.createElement("span");
  text.textContent = facts.join(" \u00b7 ");
  meta.append(text);
  const conversation = state.conversation;
  const idle = !state.live && conversation && m.id;
  if (idle && m.role === "assistant" && state.caps.regenerate && m.status !== "generating") {
    meta.append(actionButton("Regenerate", () => regenerate(m)));
  }
  if (idle && m.role === "user" && state.caps.edit) meta.append(actionButton("Edit", () => startEdit(m)));
  return meta;
}

function actionButton(label, onClick) {
  const button = document.createElement("button");
  button.type = "button";
  button.className = "small";
  button.textContent = label;
  button.addEventListener("click", onClick);
  return button;
}

function versionSwitch(m) {
  const box = document.createElement("span");
  box.className = "versions";
  const index = m.sibling_ids.indexOf(m.id);
  const previous = actionButton("\u2039", () => switchTo(m.sibling_ids[index - 1]));
  previous.setAttribute("aria-label", "Previous version");
  previous.disabled = index <= 0;
  const next = actionButton("\u203a", () => switchTo(m.sibling_ids[index + 1]));
  next.setAttribute("aria-label", "Next version");
  next.disabled = index >= m.sibling_ids.length - 1;
  const label = document.createElement("span");
  label.className = "version-label";
  label.textContent = `${index + 1} / ${m.sibling_ids.length}`;
  box.append(previous, label, next);
  return box;
}

async function switchTo(messageId) {
  if (state.live || !messageId) return;
  try {
    const conversation = await api(`/api/conversations/${state.conversation.id}`, {
      method: "PATCH",
      body: { current_id: messageId },
    });
    state.focusMessage = messageId;
    showConversation(conversation);
  } catch (err) {
    showNotice(err);
  }
}

function scrollToEnd() {
  const scroller = $("scroller");
  scroller.scrollTop = scroller.scrollHeight;
}

function nearEnd() {
  const scroller = $("scroller");
  return scroller.scrollHeight - scroller.scrollTop - scroller.clientHeight < 80;
}

// --- a reply streaming in ------------------------------------------------------------------------

function newId() {
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return [...bytes].map((b) => b.toString(16).padStart(2, "0")).join("");
}

function turnOptions(body) {
  // A reload or a closed tab must not lose the reply: let it run on when the server can be asked
  // to stop it (otherwise closing the stream is the only way to stop it).
  if (state.caps.onDisconnect && state.caps.stop) body.on_disconnect = "continue";
  if (state.caps.clientMessageId) body.client_message_id = newId();
  return body;
}

async function send() {
  const input = $("input");
  const text = input.value;
  if (!text.trim() || state.live) return;
  hideNotice();
  const conversation = state.conversation;
  const body = turnOptions({ message: text, stream: true });
  if (conversation) {
    body.conversation_id = conversation.id;
  } else {
    if (state.draft.model) body.model = state.draft.model;
    if (state.draft.system) body.system = state.draft.system;
    if (state.draft.temperature !== null) body.temperature = state.draft.temperature;
  }
  input.value = "";
  const userLi = messageElement({ role: "user", content: text });
  $("messages").append(userLi);
  $("empty").hidden = true;
  const ok = await runReply("/api/chat", body, { userLi });
  if (!ok && !input.value) input.value = text; // refused before anything was saved: nothing is lost
}

async function regenerate(m) {
  const li = document.getElementById(`m-${m.id}`);
  while (li.nextElementSibling) li.nextElementSibling.remove();
  li.remove();
  const path = `/api/conversations/${state.conversation.id}/messages/${m.id}/regenerate`;
  await runReply(path, turnOptions({ stream: true }), {});
}

function startEdit(m) {
  const li = document.getElementById(`m-${m.id}`);
  const body = li.querySelector(".content");
  const editor = document.createElement("textarea");
  editor.className = "editor";
  editor.value = m.content;
  editor.setAttribute("aria-label", "Edit message");
  const save = actionButton("Send as new version", () => submitEdit(m, editor.value));
  save.classList.add("primary");
  const cancel = actionButton("Cancel", () => fillMessage(li, m));
  editor.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      submitEdit(m, editor.value);
    } else if (event.key === "Escape") {
      fillMessage(li, m);
    }
  });
  body.replaceChildren(editor);
  li.querySelector(".meta").replaceChildren(save, cancel);
  editor.focus();
}

async function submitEdit(m, text) {
  if (!text.trim() || state.live) return;
  const li = document.getElementById(`m-${m.id}`);
  while (li.nextElementSibling) li.nextElementSibling.remove();
  const userLi = messageElement({ role: "user", content: text });
  li.replaceWith(userLi);
  const path = `/api/conversations/${state.conversation.id}/messages/${m.id}/edit`;
  await runReply(path, turnOptions({ message: text, stream: true }), { userLi });
}

// Stream one reply into a new message element. Returns false when the request was refused
// before the stream started (the caller keeps what the user typed).
async function runReply(path, body, { userLi = null }) {
  const replyLi = messageElement({ role: "assistant", content: "", status: "generating" });
  $("messages").append(replyLi);
  scrollToEnd();
  const live = startLive(replyLi);
  try {
    await follow(live, path, { body });
  } catch (err) {
    if (err.name === "AbortError") {
      markStopped(live);
    } else if (!live.started) {
      replyLi.remove();
      userLi?.remove();
      endLive(live);
      // redraw first: showConversation hides the notice, which must stay to say why
      if (state.conversation) showConversation(state.conversation);
      else $("empty").hidden = $("messages").children.length > 0;
      showNotice(err);
      return false;
    } else {
      showNotice(err);
    }
  }
  endLive(live);
  await refreshAfterTurn(live.conversationId, live);
  return true;
}

function startLive(replyLi) {
  const live = {
    controller: new AbortController(),
    li: replyLi,
    text: "",
    frame: 0,
    started: false,
    conversationId: state.conversation ? state.conversation.id : null,
    messageId: null,
    lastEventId: null,
    final: null,
  };
  state.live = live;
  $("send").hidden = true;
  $("stop").hidden = false;
  for (const button of document.querySelectorAll(".msg .meta button")) button.disabled = true;
  return live;
}

function endLive(live) {
  cancelAnimationFrame(live.frame);
  if (state.live === live) state.live = null;
  $("send").hidden = false;
  $("stop").hidden = true;
}

// Read one stream of events into `live`; on a dropped connection, re-attach where it left off.
async function follow(live, path, { body } = {}) {
  let attempt = 0;
  for (;;) {
    try {
      live.lastEventId = await stream(path, {
        body,
        signal: live.controller.signal,
        lastEventId: live.lastEventId,
        onEvent: (name, data, id) => onReplyEvent(live, name, data, id),
      });
      return;
    } catch (err) {
      const dropped = err instanceof TypeError || err.type === "network_error";
      if (!dropped || !live.messageId || !state.caps.reattach || attempt >= 3) throw err;
      attempt += 1;
      if (live.lastEventId === null) live.text = ""; // no position to resume from: the whole text again
      path = `/api/conversations/${live.conversationId}/messages/${live.messageId}/stream`;
      body = undefined;
    }
  }
}

function onReplyEvent(live, name, data, id) {
  if (name === "start") {
    live.started = true;
    live.conversationId = data.conversation_id;
    live.messageId = data.message_id;
    live.li.id = `m-${data.message_id}`;
    live.li.dataset.id = data.message_id;
    const userLi = live.li.previousElementSibling;
    if (userLi && data.user_message_id && !userLi.id) userLi.id = `m-${data.user_message_id}`;
    if (!state.conversation && location.hash !== `#c=${data.conversation_id}`) {
      history.replaceState(null, "", `#c=${data.conversation_id}`);
    }
  } else if (name === "delta") {
    live.started = true;
    live.text += data.text;
    scheduleRender(live);
  } else if (name === "done" || name === "error") {
    live.final = data.message || null;
    cancelAnimationFrame(live.frame);
    if (live.final) {
      live.text = live.final.content;
      fillMessage(live.li, live.final);
    }
    if (name === "error") showNotice({ type: data.error.type, detail: data.error.message });
  }
  void id;
}

function scheduleRender(live) {
  if (live.frame) return;
  live.frame = requestAnimationFrame(() => {
    live.frame = 0;
    const follow = nearEnd();
    renderLive(live);
    if (follow) scrollToEnd();
  });
}

// A frame renders only what can still change: the blocks before the last block boundary are
// settled, rendered once and kept; the rest (the tail) is rendered again. So a frame costs the
// last block, not the whole reply. The whole reply is rendered once more when it ends.
function renderLive(live) {
  const content = live.li.querySelector(".content");
  let view = live.view;
  if (!view || !live.text.startsWith(view.settled)) {
    content.replaceChildren(); // a new reply, or its text sent again from the start
    view = live.view = { settled: "", tail: [] };
  }
  const end = settledEnd(live.text, view.settled.length);
  if (end > view.settled.length) {
    for (const node of view.tail) node.remove();
    content.append(...renderedNodes(live.text.slice(view.settled.length, end)));
    view.settled = live.text.slice(0, end);
  }
  for (const node of view.tail) node.remove();
  view.tail = renderedNodes(live.text.slice(view.settled.length));
  content.append(...view.tail);
}

function renderedNodes(text) {
  const box = document.createElement("div");
  renderMarkdown(box, text, { final: false });
  return [...box.childNodes];
}

// Where the last complete line after a blank line, outside a code fence, starts a block that
// cannot join the one before it (not indented, not a list item); `from` if there is none.
function settledEnd(text, from) {
  let end = from;
  let fenced = false;
  let blank = false;
  for (let start = from, stop; (stop = text.indexOf("\n", start)) >= 0; start = stop + 1) {
    const line = text.slice(start, stop);
    const empty = line.trim() === "";
    if (!fenced && blank && !empty && !/^(\s|[-*+]\s|\d+[.)]\s)/.test(line)) end = start;
    if (/^ {0,3}(```|~~~)/.test(line)) fenced = !fenced;
    blank = !fenced && empty;
  }
  return end;
}

function markStopped(live) {
  cancelAnimationFrame(live.frame);
  live.stopped = true;
  live.final = { role: "assistant", content: live.text, status: "incomplete", finish_reason: "stopped", model: null };
  fillMessage(live.li, live.final);
}

async function stopReply() {
  const live = state.live;
  if (!live) return;
  if (state.caps.stop && live.messageId && live.conversationId) {
    try {
      await api(`/api/conversations/${live.conversationId}/messages/${live.messageId}/stop`, { method: "POST" });
      return; // the stream ends with `done` carrying the saved reply
    } catch {
      // fall back to closing the stream, which stops the reply too
    }
  }
  live.controller.abort();
}

async function reattach(conversationId, messageId) {
  const li = document.getElementById(`m-${messageId}`);
  if (!li) return;
  const live = startLive(li);
  live.started = true;
  live.conversationId = conversationId;
  live.messageId = messageId;
  const path = `/api/conversations/${conversationId}/messages/${messageId}/stream`;
  try {
    await follow(live, path, {});
  } catch (err) {
    if (err.name === "AbortError") markStopped(live);
    else showNotice(err);
  }
  endLive(live);
  await refreshAfterTurn(conversationId, live);
}

async function refreshAfterTurn(conversationId, live) {
  if (!conversationId) return;
  const wasNew = !state.conversation;
  try {
    const conversation = await api(`/api/conversations/${conversationId}`);
    state.conversation = conversation;
    showHeader();
    if (wasNew) fillSettings();
    fillModelPicker();
    let messages = conversation.messages;
    if (live.stopped) {
      // the stream was closed to stop the reply: the server may save it a moment after this read
      messages = messages.map((m) =>
        m.id === live.messageId && (m.content || "").length < live.text.length ? { ...m, ...live.final } : m,
      );
    }
    syncMessages(messages);
    if (wasNew && location.hash !== `#c=${conversationId}`) history.replaceState(null, "", `#c=${conversationId}`);
  } catch (err) {
    if (err.type !== "conversation_not_found") showNotice(err);
  }
  await resetList();
}

// After a turn: update the messages in place when the branch is the one shown (a long
// conversation is not rebuilt), else show the branch the server has.
function syncMessages(messages) {
  const shown = [...$("messages").children];
  const same = shown.length === messages.length && messages.every((m, i) => shown[i].id === `m-${m.id}`);
  if (!same) {
    renderMessages(messages);
    return;
  }
  const last = Math.max(0, messages.length - 2);
  messages.forEach((m, i) => {
    if (i >= last) fillMessage(shown[i], m);
    else shown[i].querySelector(".meta").replaceWith(metaLine(m));
  });
}

// --- rename, delete, export, import, search ------------------------------------------------------

function renameConversation() {
  const conversation = state.conversation;
  if (!conversation) return;
  const dialog = $("rename-dialog");
  $("rename-input").value = conversation.title || "";
  $("rename-form").onsubmit = async (event) => {
    event.preventDefault();
    const title = $("rename-input").value.trim();
    if (!title) return;
    dialog.close();
    try {
      state.conversation = await api(`/api/conversations/${conversation.id}`, { method: "PATCH", body: { title } });
      showHeader();
      const link = $("conversations").querySelector(`li[data-id="${conversation.id}"] a`);
      if (link) link.textContent = title;
    } catch (err) {
      showNotice(err);
    }
  };
  $("rename-cancel").onclick = () => dialog.close();
  dialog.showModal();
  $("rename-input").select();
}

function deleteConversation() {
  const conversation = state.conversation;
  if (!conversation) return;
  const dialog = $("confirm-dialog");
  $("confirm-message").textContent = `Delete \u201c${conversation.title || "Untitled"}\u201d and all its messages? This cannot be undone.`;
  $("confirm-form").onsubmit = async (event) => {
    event.preventDefault();
    dialog.close();
    try {
      await api(`/api/conversations/${conversation.id}`, { method: "DELETE" });
      newChat();
      await resetList();
    } catch (err) {
      showNotice(err);
    }
  };
  $("confirm-cancel").onclick = () => dialog.close();
  dialog.showModal();
  $("confirm-cancel").focus();
}

function exportDialog(all) {
  const dialog = $("export-dialog");
  const id = state.conversation && state.conversation.id;
  $("export-title").textContent = all ? "Export every conversation" : "Export this conversation";
  const go = async (format) => {
    dialog.close();
    const path = all ? `/api/export?format=${format}` : `/api/conversations/${id}/export?format=${format}`;
    const extension = all ? "zip" : format === "json" ? "json" : "md";
    try {
      await download(path, `${all ? "conversations" : id}.${extension}`);
    } catch (err) {
      showNotice(err);
    }
  };
  $("export-markdown").onclick = () => go("markdown");
  $("export-json").onclick = () => go("json");
  $("export-form").onsubmit = (event) => event.preventDefault();
  $("export-cancel").onclick = () => dialog.close();
  dialog.showModal();
}

async function importFile(file) {
  if (!file || !state.caps.import) return;
  const form = new FormData();
  form.append("file", file, file.name);
  try {
    const response = await request("/api/import", { method: "POST", body: form });
    showImportReport(await response.json());
    await resetList();
  } catch (err) {
    showNotice(err);
  }
}

function showImportReport(report) {
  const box = $("report");
  box.replaceChildren();
  const imported = report.imported || [];
  const skipped = report.skipped || [];
  const summary = document.createElement("p");
  summary.textContent = `Imported ${imported.length} conversation${imported.length === 1 ? "" : "s"}, skipped ${skipped.length}.`;
  box.append(summary);
  if (imported.length) {
    const list = document.createElement("ul");
    list.className = "report-imported";
    for (const item of imported) {
      const li = document.createElement("li");
      const link = document.createElement("a");
      link.href = `#c=${item.id}`;
      link.textContent = `${item.title || "Untitled"} (${item.messages} messages)`;
      link.addEventListener("click", () => $("report-dialog").close());
      li.append(link);
      list.append(li);
    }
    box.append(list);
  }
  if (skipped.length) {
    const list = document.createElement("ul");
    list.className = "report-skipped";
    for (const item of skipped) {
      const li = document.createElement("li");
      li.textContent = `${item.title || item.source_id || "?"}: ${item.reason}`;
      list.append(li);
    }
    box.append(list);
  }
  const dropped = Object.entries(report.dropped || {});
  if (dropped.length) {
    const note = document.createElement("p");
    note.className = "hint";
    note.textContent = `Left out (no place for them here): ${dropped.map(([k, n]) => `${n} ${k}`).join(", ")}.`;
    box.append(note);
  }
  $("report-form").onsubmit = (event) => {
    event.preventDefault();
    $("report-dialog").close();
  };
  $("report-dialog").showModal();
}

let searchTimer = 0;
let searchRun = 0;

function onSearchInput() {
  clearTimeout(searchTimer);
  searchTimer = setTimeout(runSearch, 250);
}

async function runSearch() {
  const q = $("search").value.trim();
  const results = $("search-results");
  const run = ++searchRun;
  if (!q) {
    results.hidden = true;
    $("conversations").hidden = false;
    return;
  }
  results.hidden = false;
  $("conversations").hidden = true;
  try {
    const page = await api(`/api/search?${new URLSearchParams({ q, limit: "30" })}`);
    if (run !== searchRun) return;
    results.replaceChildren(...page.items.map(searchHit));
    if (!page.items.length) results.append(note("Nothing found."));
  } catch (err) {
    if (run !== searchRun) return;
    results.replaceChildren(note(describe(err).text));
  }
}

function note(text) {
  const li = document.createElement("li");
  li.className = "hint";
  li.textContent = text;
  return li;
}

function searchHit(hit) {
  const li = document.createElement("li");
  const link = document.createElement("a");
  link.href = `#c=${hit.conversation_id}`;
  link.className = "hit";
  const title = document.createElement("strong");
  title.textContent = hit.conversation_title || "Untitled";
  const snippet = document.createElement("span");
  snippet.className = "snippet";
  for (const segment of hit.snippet || []) {
    const part = document.createElement(segment.match ? "mark" : "span");
    part.textContent = segment.text;
    snippet.append(part);
  }
  link.append(title, snippet);
  link.addEventListener("click", (event) => {
    event.preventDefault();
    state.focusMessage = hit.message_id;
    if (location.hash === `#c=${hit.conversation_id}`) openConversation(hit.conversation_id);
    else location.hash = `#c=${hit.conversation_id}`;
  });
  li.append(link);
  return li;
}

// --- layout and keys -----------------------------------------------------------------------------

function openSidebar(open) {
  document.body.classList.toggle("sidebar-open", open);
  $("open-sidebar").setAttribute("aria-expanded", String(open));
  if (open) $("new-chat").focus();
}

function closeSidebarOnNarrow() {
  if (document.body.classList.contains("sidebar-open")) openSidebar(false);
}

function toggleSettings() {
  const panel = $("settings");
  panel.hidden = !panel.hidden;
  $("settings-toggle").setAttribute("aria-expanded", String(!panel.hidden));
  if (!panel.hidden) $("system").focus();
}

function wire() {
  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    send();
  });
  $("input").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      send();
    } else if (event.key === "Escape" && state.live) {
      stopReply();
    }
  });
  $("stop").addEventListener("click", stopReply);
  $("new-chat").addEventListener("click", () => newChat());
  $("rename").addEventListener("click", renameConversation);
  $("delete").addEventListener("click", deleteConversation);
  $("settings-toggle").addEventListener("click", toggleSettings);
  $("settings-save").addEventListener("click", saveSettings);
  $("model").addEventListener("change", changeModel);
  $("open-sidebar").addEventListener("click", () => openSidebar(true));
  $("close-sidebar").addEventListener("click", () => openSidebar(false));
  $("export-one").addEventListener("click", () => exportDialog(false));
  $("export-all").addEventListener("click", () => exportDialog(true));
  $("import").addEventListener("click", () => $("import-file").click());
  $("import-file").addEventListener("change", () => {
    importFile($("import-file").files[0]);
    $("import-file").value = "";
  });
  $("search-form").addEventListener("submit", (event) => {
    event.preventDefault();
    runSearch();
  });
  $("search").addEventListener("input", onSearchInput);
  document.addEventListener("dragover", (event) => {
    if (state.caps.import && event.dataTransfer.types.includes("Files")) event.preventDefault();
  });
  document.addEventListener("drop", (event) => {
    if (!state.caps.import || !event.dataTransfer.files.length) return;
    event.preventDefault();
    importFile(event.dataTransfer.files[0]);
  });
  window.addEventListener("hashchange", routeFromHash);
  new IntersectionObserver((entries) => {
    if (entries.some((e) => e.isIntersecting)) loadMore();
  }, { root: $("sidebar"), rootMargin: "200px" }).observe($("list-end"));
}

async function start() {
  const caps = capabilities().then((found) => {
    state.caps = found;
    $("search-form").hidden = !found.search;
    $("export-all").hidden = !found.exportAll;
    $("import").hidden = !found.import;
  });
  const models = loadModels().catch(showNotice);
  wire();
  await Promise.all([caps, resetList()]); // the models may be slow to list: nothing else waits for them
  await Promise.all([models, routeFromHash()]);
  document.body.dataset.ready = "true"; // for the browser tests: the first render is done
}

start();
