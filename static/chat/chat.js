// The chat page: one WebSocket per tab on /ws/conversations/<uuid>/ (protocol in
// README.md, "WebSocket protocol"), the REST API for conversation management.
//
// Rules kept throughout:
// - untrusted text (user messages, titles, errors) goes in with textContent; model
//   answers are markdown rendered by marked, then sanitized by DOMPurify;
// - deltas are applied by seq, each exactly once; a gap asks the server for a fresh
//   `state` frame instead of ever showing text with a hole in it;
// - every `state` frame rebuilds the transcript from scratch, so a reconnect never
//   duplicates text.

import { marked } from "../vendor/marked/marked.esm.js";
import DOMPurify from "../vendor/dompurify/purify.es.mjs";
import hljs from "../vendor/highlight/highlight.min.js";

const config = JSON.parse(document.getElementById("chat-config").textContent);
const $ = (id) => document.getElementById(id);

const RECONNECT_BASE_MS = 500;
const RECONNECT_MAX_MS = 10000;
// Within this many pixels of the bottom the view counts as "at the end" and follows
// the stream; further up, the user is reading and is left alone.
const FOLLOW_SLACK_PX = 48;
const SEQ_UNKNOWN = -1;
const STATUS_LABELS = {
  cancelled: "Stopped",
  failed: "Failed",
  interrupted: "Interrupted",
};

const state = {
  conversation: null,            // conversation dict, null until the first message
  messages: [],                  // visible message dicts, in order
  lastSeq: new Map(),            // message id -> seq of the last delta applied
  streamingId: null,             // id of the assistant message streaming now
  socket: null,
  ready: false,                  // the current socket has delivered its `state` frame
  syncing: false,                // a `sync` was sent; deltas wait for the `state` frame
  reconnectAttempts: 0,
  reconnectTimer: null,
  leaving: false,
  outbox: [],                    // frames typed while offline, sent after reconnect
  pending: null,                 // what this tab asked for: {type, content}
  follow: true,                  // the view follows the end of the transcript
  renderQueued: new Set(),
  conversations: JSON.parse(document.getElementById("chat-conversations").textContent),
  searchResults: null,           // null: show state.conversations
  stateFrames: 0,                // state frames received (tests check resyncs)
  debugLoseDeltas: 0,
};

// --- markdown -------------------------------------------------------------------------

marked.use({
  gfm: true,
  breaks: false,
  renderer: {
    // Raw HTML in an answer is shown as text, not interpreted: a model explaining HTML
    // should be readable, and nothing it writes can become markup.
    html({ text }) {
      return escapeHtml(text);
    },
  },
});

DOMPurify.addHook("afterSanitizeAttributes", (node) => {
  if (node.tagName === "A" && node.hasAttribute("href")) {
    node.setAttribute("target", "_blank");
    node.setAttribute("rel", "noopener noreferrer nofollow");
  }
});

const SANITIZE_OPTIONS = {
  USE_PROFILES: { html: true },
  // Images and forms in model output could leak data to other hosts or look like UI.
  FORBID_TAGS: ["img", "style", "form", "input", "button", "textarea", "select",
    "video", "audio", "picture", "source", "iframe"],
  FORBID_ATTR: ["style", "srcset"],
};

function escapeHtml(text) {
  return String(text).replace(/[&<>"']/g, (c) => (
    { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]
  ));
}

/** Markdown -> sanitized DOM fragment (never a string handed to innerHTML unsanitized). */
function renderMarkdown(text) {
  const html = marked.parse(text || "");
  return DOMPurify.sanitize(html, { ...SANITIZE_OPTIONS, RETURN_DOM_FRAGMENT: true });
}

function decorateCodeBlocks(container) {
  for (const code of container.querySelectorAll("pre > code")) {
    try {
      hljs.highlightElement(code);
    } catch (err) {
      console.warn("highlight failed", err);
    }
    const pre = code.parentElement;
    pre.classList.add("code-block");
    const lang = [...code.classList].find((c) => c.startsWith("language-"));
    const bar = document.createElement("div");
    bar.className = "code-bar";
    const label = document.createElement("span");
    label.textContent = lang ? lang.slice("language-".length) : "code";
    const copy = document.createElement("button");
    copy.type = "button";
    copy.className = "copy-btn";
    copy.textContent = "Copy";
    copy.setAttribute("aria-label", "Copy code");
    copy.addEventListener("click", () => copyText(code.textContent, copy));
    bar.append(label, copy);
    pre.insertBefore(bar, code);
  }
}

async function copyText(text, button) {
  const old = button.textContent;
  try {
    await navigator.clipboard.writeText(text);
    button.textContent = "Copied";
  } catch {
    button.textContent = "Copy failed";
  }
  setTimeout(() => { button.textContent = old; }, 1500);
}

// --- formatting -----------------------------------------------------------------------

function formatCost(costUsd) {
  const value = Number(costUsd);
  if (!Number.isFinite(value)) return "";
  if (value === 0) return "$0";
  if (value < 0.01) return `$${value.toFixed(6).replace(/0+$/, "")}`;
  return `$${value.toFixed(4)}`;
}

function formatUsage(usage) {
  if (!usage) return "";
  const parts = [
    `${usage.total_tokens} tokens (${usage.prompt_tokens} in · ${usage.completion_tokens} out)`,
    formatCost(usage.cost_usd),
  ];
  if (usage.estimated) parts.push("estimated");
  return parts.filter(Boolean).join(" · ");
}

function formatWhen(value) {
  const date = new Date(value);
  if (Number.isNaN(date.getTime())) return String(value);
  return date.toLocaleString();
}

function conversationUrl(id) {
  return config.conversation_url_template.replace("{id}", id);
}

// --- transcript rendering ---------------------------------------------------------------

function messageElement(id) {
  return document.querySelector(`.msg[data-id="${CSS.escape(id)}"]`);
}

function lastOfRole(role) {
  for (let i = state.messages.length - 1; i >= 0; i -= 1) {
    if (state.messages[i].role === role) return state.messages[i];
  }
  return null;
}

/** Build the whole transcript from state.messages (after a `state` frame). */
function renderTranscript() {
  const transcript = $("transcript");
  for (const el of transcript.querySelectorAll(".msg")) el.remove();
  for (const message of state.messages) {
    if (message.role === "system") continue;
    transcript.append(buildMessage(message));
  }
  refreshChrome();
  // The first state jumps to the end; a later one (reconnect, resync) leaves a reader
  // who scrolled up where they are.
  scrollToEndIfFollowing(state.stateFrames <= 1);
}

function buildMessage(message) {
  const article = document.createElement("article");
  article.className = `msg msg-${message.role}`;
  article.dataset.id = message.id;
  const role = document.createElement("div");
  role.className = "msg-role";
  role.textContent = message.role === "user" ? "You" : (message.model || "Assistant");
  const body = document.createElement("div");
  body.className = message.role === "assistant" ? "msg-body markdown" : "msg-body plain";
  const status = document.createElement("div");
  status.className = "msg-status";
  const meta = document.createElement("div");
  meta.className = "msg-meta";
  const usage = document.createElement("span");
  usage.className = "msg-usage";
  const actions = document.createElement("span");
  actions.className = "msg-actions";
  meta.append(usage, actions);
  article.append(role, body, status, meta);
  updateMessageElement(article, message);
  return article;
}

function updateMessageElement(article, message) {
  article.dataset.status = message.status;
  article.classList.toggle("pending", Boolean(message.pending));
  const body = article.querySelector(".msg-body");
  if (message.role === "assistant") {
    body.replaceChildren(renderMarkdown(message.content));
    decorateCodeBlocks(body);
    if (message.status === "streaming") {
      const caret = document.createElement("span");
      caret.className = "caret";
      caret.setAttribute("aria-hidden", "true");
      let tail = body.lastElementChild || body;
      if (tail.tagName === "PRE") tail = tail.querySelector("code") || tail;
      tail.append(caret);
    }
    // Screen readers wait for the whole answer instead of reading every delta.
    article.setAttribute("aria-busy", message.status === "streaming" ? "true" : "false");
  } else {
    body.textContent = message.content;
  }
  const status = article.querySelector(".msg-status");
  status.replaceChildren();
  const label = STATUS_LABELS[message.status];
  if (message.pending) {
    status.textContent = message.pending;
  } else if (label) {
    const badge = document.createElement("span");
    badge.className = `badge badge-${message.status}`;
    badge.textContent = label;
    status.append(badge);
    const why = message.error || (message.status === "cancelled"
      ? "The answer was stopped; the text above is what was written before."
      : message.status === "interrupted" ? "The server running this answer went away." : "");
    if (why) {
      const detail = document.createElement("span");
      detail.className = "status-detail";
      detail.textContent = why;
      status.append(detail);
    }
  }
  article.querySelector(".msg-usage").textContent =
    message.role === "assistant" && message.status !== "streaming" ? formatUsage(message.usage) : "";
}

function renderMessage(id) {
  const message = state.messages.find((m) => m.id === id);
  const el = messageElement(id);
  if (!message || !el) return;
  updateMessageElement(el, message);
  refreshActions();
  scrollToEndIfFollowing();
}

/** Coalesce renders of a streaming answer to one per animation frame. */
function queueRender(id) {
  if (state.renderQueued.has(id)) return;
  state.renderQueued.add(id);
  requestAnimationFrame(() => {
    state.renderQueued.delete(id);
    renderMessage(id);
  });
}

function appendMessage(message) {
  state.messages.push(message);
  if (message.role !== "system") $("transcript").append(buildMessage(message));
  refreshChrome();
  scrollToEndIfFollowing(message.role === "user");
}

function removeMessages(predicate) {
  const removed = state.messages.filter(predicate);
  state.messages = state.messages.filter((m) => !predicate(m));
  for (const m of removed) messageElement(m.id)?.remove();
}

/** Regenerate/edit buttons on the last answer and the last user message only. */
function refreshActions() {
  const busy = Boolean(state.streamingId);
  const lastUser = lastOfRole("user");
  const lastAssistant = lastOfRole("assistant");
  for (const el of document.querySelectorAll(".msg")) {
    const actions = el.querySelector(".msg-actions");
    actions.replaceChildren();
    const message = state.messages.find((m) => m.id === el.dataset.id);
    if (!message || message.pending) continue;
    if (message.role === "assistant" && message.status !== "streaming") {
      actions.append(actionButton("Copy", "copy-answer", (b) => copyText(message.content, b)));
      if (message === lastAssistant && !busy && lastUser && state.messages.indexOf(lastUser) < state.messages.indexOf(message)) {
        actions.append(actionButton("Regenerate", "regenerate", () => regenerate()));
      }
    }
    if (message.role === "user" && message === lastUser && !busy) {
      actions.append(actionButton("Edit", "edit", () => startEdit(message)));
    }
  }
}

function actionButton(text, name, onClick) {
  const button = document.createElement("button");
  button.type = "button";
  button.className = `link-btn action-${name}`;
  button.textContent = text;
  button.addEventListener("click", () => onClick(button));
  return button;
}

/** Everything outside the transcript that depends on state. */
function refreshChrome() {
  const streaming = Boolean(state.streamingId);
  $("stop").hidden = !streaming;
  $("send").hidden = streaming;
  $("empty-state").hidden = state.messages.length > 0;
  const title = state.conversation?.title || "New chat";
  $("conversation-title").textContent = title;
  document.title = `${title} · Chat`;
  $("rename").hidden = !state.conversation;
  $("delete").hidden = !state.conversation;
  refreshActions();
}

// --- scrolling --------------------------------------------------------------------------

function atEnd() {
  const t = $("transcript");
  return t.scrollHeight - t.scrollTop - t.clientHeight <= FOLLOW_SLACK_PX;
}

function scrollToEndIfFollowing(force = false) {
  const t = $("transcript");
  if (force) state.follow = true;
  if (state.follow) {
    t.scrollTop = t.scrollHeight;
    $("jump").hidden = true;
  } else {
    $("jump").hidden = false;
  }
}

function onTranscriptScroll() {
  state.follow = atEnd();
  if (state.follow) $("jump").hidden = true;
}

// --- notices and connection indicator ----------------------------------------------------

function showNotice(text, kind = "error") {
  $("notice-text").textContent = text;
  $("notice").dataset.kind = kind;
  $("notice").hidden = false;
}

function hideNotice() {
  $("notice").hidden = true;
}

function announce(text) {
  $("announcer").textContent = text;
}

function setConnection(kind, text) {
  const el = $("connection");
  el.dataset.state = kind;
  el.textContent = text;
  document.body.classList.toggle("offline", kind === "offline");
}

// --- socket -----------------------------------------------------------------------------

function socketUrl() {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  return `${scheme}//${location.host}${config.ws_path}`;
}

function connect() {
  clearTimeout(state.reconnectTimer);
  state.ready = false;
  const socket = new WebSocket(socketUrl());
  state.socket = socket;
  socket.addEventListener("message", (event) => {
    if (socket !== state.socket) return;
    let frame;
    try {
      frame = JSON.parse(event.data);
    } catch {
      console.warn("ignored a frame that is not JSON");
      return;
    }
    if (frame.type === "delta" && state.debugLoseDeltas > 0) {
      state.debugLoseDeltas -= 1;  // a test simulates a frame lost on the way
      return;
    }
    handleFrame(frame);
  });
  socket.addEventListener("close", (event) => {
    if (socket !== state.socket) return;
    onSocketClosed(event);
  });
}

function onSocketClosed(event) {
  state.ready = false;
  state.socket = null;
  if (state.leaving) return;
  if (event.code === 4401) {
    location.assign(`/accounts/login/?next=${encodeURIComponent(location.pathname)}`);
    return;
  }
  if (event.code === 4403) {
    setConnection("offline", "No access");
    showNotice("This conversation belongs to someone else.");
    return;
  }
  scheduleReconnect();
}

function scheduleReconnect() {
  const attempt = state.reconnectAttempts;
  state.reconnectAttempts += 1;
  const delay = Math.min(RECONNECT_MAX_MS, RECONNECT_BASE_MS * 2 ** attempt)
    * (0.75 + Math.random() * 0.5);
  setConnection("offline", `Offline · reconnecting in ${Math.ceil(delay / 1000)} s`);
  clearTimeout(state.reconnectTimer);
  state.reconnectTimer = setTimeout(connect, delay);
}

function reconnectNow() {
  if (state.socket || state.leaving) return;
  state.reconnectAttempts = 0;
  connect();
}

function sendFrame(frame) {
  if (state.socket && state.ready && state.socket.readyState === WebSocket.OPEN) {
    state.socket.send(JSON.stringify(frame));
    return true;
  }
  return false;
}

function requestSync() {
  if (state.syncing) return;
  state.syncing = true;
  if (!sendFrame({ type: "sync" })) state.syncing = false;
}

// --- frames from the server ----------------------------------------------------------------

function handleFrame(frame) {
  switch (frame.type) {
    case "state": return onState(frame);
    case "message": return onUserMessage(frame);
    case "generation.start": return onGenerationStart(frame);
    case "delta": return onDelta(frame);
    case "generation.end": return onGenerationEnd(frame);
    case "error": return onError(frame);
    case "conversation": return applyConversation(frame.conversation);
    case "conversation.deleted": return onConversationDeleted(frame);
    default: console.warn("unknown frame", frame.type);
  }
}

function onState(frame) {
  state.stateFrames += 1;
  state.ready = true;
  state.syncing = false;
  state.reconnectAttempts = 0;
  setConnection("online", "Online");
  state.conversation = frame.conversation;
  // A message sent just before the socket dropped: either the server has it (it is in
  // this state) or it never arrived and goes back to the outbox.
  if (state.pending?.type === "message") {
    const lastUser = [...frame.messages].reverse().find((m) => m.role === "user");
    const content = state.pending.content;
    if (!lastUser || lastUser.content !== content) {
      state.outbox.unshift(messageFrame(content));
      for (const m of state.messages) {
        if (m.pending && m.content === content) m.pending = "Offline: this message is sent when the connection is back.";
      }
    } else {
      state.messages = state.messages.filter((m) => !(m.pending && m.content === content));
    }
    state.pending = null;
  }
  // Messages this tab queued while offline stay on screen until they are sent.
  const queued = state.messages.filter((m) => m.pending);
  state.messages = [...frame.messages, ...queued];
  state.lastSeq.clear();
  state.streamingId = null;
  for (const m of frame.messages) {
    if (m.status === "streaming") state.streamingId = m.id;
  }
  if (frame.generation) {
    // seq null: the server could only give the last saved checkpoint, so which deltas
    // it includes is unknown; deltas are then not applied (they could repeat or skip
    // text) and the final text is fetched when the run ends.
    const seq = frame.generation.seq;
    state.lastSeq.set(frame.generation.message_id, seq === null || seq === undefined ? SEQ_UNKNOWN : seq);
  }
  renderTranscript();
  applyConversation(frame.conversation);
  flushOutbox();
}

function onUserMessage(frame) {
  const mine = state.pending && state.pending.content === frame.message.content;
  if (mine && state.pending.type === "edit") {
    const old = lastOfRole("user");
    if (old) {
      const from = state.messages.indexOf(old);
      const gone = new Set(state.messages.slice(from).map((m) => m.id));
      removeMessages((m) => gone.has(m.id));
    }
  }
  removeMessages((m) => m.pending && m.content === frame.message.content);
  if (state.messages.some((m) => m.id === frame.message.id)) return;
  appendMessage(frame.message);
  if (frame.conversation) applyConversation(frame.conversation);
  if (mine) {
    state.pending = null;
  } else {
    // Another tab sent it; it may have been an edit, which supersedes messages this
    // tab still shows. The state frame is the truth.
    requestSync();
  }
}

function onGenerationStart(frame) {
  const message = frame.message;
  // A new answer always answers the last user message: any answer shown after it was
  // superseded (regenerate, here or in another tab).
  const lastUser = lastOfRole("user");
  const from = lastUser ? state.messages.indexOf(lastUser) + 1 : 0;
  const stale = new Set(state.messages.slice(from).filter((m) => m.role === "assistant").map((m) => m.id));
  removeMessages((m) => stale.has(m.id));
  if (state.pending?.type === "regenerate") state.pending = null;
  state.streamingId = message.id;
  if (!state.lastSeq.has(message.id)) state.lastSeq.set(message.id, 0);
  if (!state.messages.some((m) => m.id === message.id)) appendMessage({ ...message });
  refreshChrome();
  announce("Answer started.");
}

function onDelta(frame) {
  if (state.syncing) return;  // the coming state frame includes it
  const message = state.messages.find((m) => m.id === frame.message_id);
  const last = state.lastSeq.get(frame.message_id);
  if (!message || last === undefined) {
    requestSync();
    return;
  }
  if (last === SEQ_UNKNOWN) return;
  if (frame.seq <= last) return;       // already applied (e.g. included in a state frame)
  if (frame.seq !== last + 1) {        // a gap: never show text with a hole in it
    requestSync();
    return;
  }
  message.content += frame.content;
  state.lastSeq.set(frame.message_id, frame.seq);
  queueRender(message.id);
}

function onGenerationEnd(frame) {
  const message = state.messages.find((m) => m.id === frame.message_id);
  if (state.streamingId === frame.message_id) state.streamingId = null;
  if (!message) {
    requestSync();
    refreshChrome();
    return;
  }
  Object.assign(message, {
    status: frame.status,
    finish_reason: frame.finish_reason,
    usage: frame.usage,
    error: frame.error,
  });
  renderMessage(message.id);
  refreshChrome();
  if (state.lastSeq.get(message.id) === SEQ_UNKNOWN) requestSync();
  if (frame.status === "failed") {
    showNotice(`The model failed: ${frame.error || "unknown error"}`);
  }
  announce(frame.status === "completed" ? "Answer complete." : `Answer ${STATUS_LABELS[frame.status] || frame.status}.`);
}

function describeError(frame) {
  switch (frame.code) {
    case "busy":
      return "An answer is already being written in this conversation. Wait for it or press Stop.";
    case "quota_exceeded": {
      const parts = [frame.detail || "You have used up your budget."];
      for (const [key, value] of Object.entries(frame)) {
        if (["type", "code", "detail"].includes(key) || value === null || value === undefined) continue;
        const label = key.replace(/_/g, " ");
        const shown = /reset|until|_at$/.test(key) ? formatWhen(value)
          : typeof value === "object" ? JSON.stringify(value) : String(value);
        parts.push(`${label}: ${shown}`);
      }
      return parts.join(" · ");
    }
    case "too_large":
    case "empty":
    case "invalid":
    default:
      return frame.detail || `Error: ${frame.code}`;
  }
}

function onError(frame) {
  // A refused send is given back to the input so the text is never lost.
  const pending = state.pending;
  state.pending = null;
  if (pending && (pending.type === "message" || pending.type === "edit")) {
    removeMessages((m) => m.pending && m.content === pending.content);
    refreshChrome();
    if (!$("input").value.trim()) $("input").value = pending.content;
    autosize();
  }
  showNotice(describeError(frame), frame.code === "busy" ? "warning" : "error");
}

// --- user actions ---------------------------------------------------------------------------

function messageFrame(content) {
  const frame = { type: "message", content };
  if (!state.conversation) {
    // The first message creates the conversation with the settings chosen here.
    frame.model = $("model").value || config.default_model;
    frame.system_prompt = $("system-prompt").value;
  }
  return frame;
}

function submitMessage() {
  const input = $("input");
  const content = input.value.trim();
  if (!content) return;
  if (state.streamingId) {
    showNotice("Wait for the answer to finish, or press Stop.", "warning");
    return;
  }
  if (content.length > config.max_message_chars) {
    showNotice(`A message is at most ${config.max_message_chars} characters.`);
    return;
  }
  hideNotice();
  input.value = "";
  saveDraft();
  autosize();
  state.follow = true;
  const frame = messageFrame(content);
  if (sendFrame(frame)) {
    state.pending = { type: "message", content };
    appendMessage(localUserMessage(content, "Sending…"));
  } else {
    state.outbox.push(frame);
    appendMessage(localUserMessage(content, "Offline: this message is sent when the connection is back."));
  }
}

function localUserMessage(content, note) {
  return {
    id: `local-${Date.now()}-${Math.random().toString(16).slice(2)}`,
    role: "user",
    content,
    status: "completed",
    pending: note,
  };
}

function flushOutbox() {
  while (state.outbox.length && !state.streamingId) {
    const frame = state.outbox.shift();
    if (frame.type === "message" && state.conversation) {
      delete frame.model;
      delete frame.system_prompt;
    }
    if (!sendFrame(frame)) {
      state.outbox.unshift(frame);
      return;
    }
    state.pending = { type: frame.type, content: frame.content };
    for (const m of state.messages) {
      if (m.pending && m.content === frame.content) m.pending = "Sending…";
    }
    renderTranscript();
    // One at a time: the next would be refused as busy while this one is answered.
    return;
  }
  if (state.outbox.length && state.streamingId) {
    for (const m of state.messages) {
      if (m.pending) m.pending = "Waiting: an answer is still being written.";
    }
    renderTranscript();
  }
}

function stop() {
  if (!state.streamingId) return;
  if (!sendFrame({ type: "stop" })) {
    // A run started from this tab was already stopped by the disconnect itself.
    showNotice("Offline: Stop needs the connection; reconnecting…", "warning");
    return;
  }
  $("stop").disabled = true;
  setTimeout(() => { $("stop").disabled = false; }, 1000);
}

function regenerate() {
  if (state.streamingId) return;
  if (!sendFrame({ type: "regenerate" })) {
    showNotice("Offline: try again when the connection is back.", "warning");
    return;
  }
  hideNotice();
  state.pending = { type: "regenerate" };
}

function startEdit(message) {
  const el = messageElement(message.id);
  if (!el || el.querySelector(".edit-form")) return;
  const body = el.querySelector(".msg-body");
  const form = document.createElement("form");
  form.className = "edit-form";
  const area = document.createElement("textarea");
  area.value = message.content;
  area.rows = Math.min(10, message.content.split("\n").length + 1);
  area.setAttribute("aria-label", "Edit your message");
  const save = document.createElement("button");
  save.type = "submit";
  save.className = "btn btn-primary btn-small";
  save.textContent = "Save & send";
  const cancel = document.createElement("button");
  cancel.type = "button";
  cancel.className = "btn btn-ghost btn-small";
  cancel.textContent = "Cancel";
  const buttons = document.createElement("div");
  buttons.className = "edit-actions";
  buttons.append(cancel, save);
  form.append(area, buttons);
  body.hidden = true;
  el.insertBefore(form, body.nextSibling);
  area.focus();
  const close = () => { form.remove(); body.hidden = false; };
  cancel.addEventListener("click", close);
  area.addEventListener("keydown", (event) => {
    if (event.key === "Escape") { event.stopPropagation(); close(); }
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      form.requestSubmit();
    }
  });
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const content = area.value.trim();
    if (!content || content === message.content) { close(); return; }
    if (!sendFrame({ type: "edit", content })) {
      showNotice("Offline: your edit is kept here; send it when the connection is back.", "warning");
      return;
    }
    state.pending = { type: "edit", content };
    close();
  });
}

// --- conversation settings, rename, delete (REST API) ---------------------------------------

function csrfToken() {
  const match = document.cookie.match(/(?:^|;\s*)csrftoken=([^;]+)/);
  return match ? decodeURIComponent(match[1]) : "";
}

async function api(method, path, body) {
  const response = await fetch(path, {
    method,
    credentials: "same-origin",
    headers: {
      Accept: "application/json",
      ...(body ? { "Content-Type": "application/json" } : {}),
      ...(method !== "GET" ? { "X-CSRFToken": csrfToken() } : {}),
    },
    body: body ? JSON.stringify(body) : undefined,
  });
  if (!response.ok) {
    let detail = "";
    try {
      const data = await response.json();
      detail = data.detail || Object.entries(data).map(([k, v]) => `${k}: ${v}`).join("; ");
    } catch { /* not JSON */ }
    const error = new Error(detail || `HTTP ${response.status}`);
    error.status = response.status;
    throw error;
  }
  return response.status === 204 ? null : response.json();
}

// Another tab (or a script) deleted this conversation: nothing left to show here.
function onConversationDeleted() {
  state.leaving = true;
  location.assign(config.new_chat_url);
}

function applyConversation(conversation) {
  if (conversation) {
    state.conversation = conversation;
    upsertSidebar(conversation);
  }
  refreshChrome();
  fillSettings();
}

function fillSettings() {
  const select = $("model");
  const current = state.conversation?.model || config.default_model;
  const models = [...config.models];
  if (current && !models.includes(current)) models.push(current);
  if (select.options.length !== models.length || document.activeElement !== select) {
    select.replaceChildren(...models.map((name) => {
      const option = document.createElement("option");
      option.value = name;
      option.textContent = name;
      return option;
    }));
  }
  select.value = current;
  const prompt = $("system-prompt");
  if (document.activeElement !== prompt && !prompt.dataset.dirty) {
    prompt.value = state.conversation ? state.conversation.system_prompt : (prompt.value || "");
  }
  prompt.placeholder = config.default_system_prompt;
  $("settings-note").textContent = state.conversation
    ? ""
    : "Used when your first message creates this conversation.";
}

async function saveSettings() {
  const body = { model: $("model").value, system_prompt: $("system-prompt").value };
  if (!state.conversation) {
    $("settings-note").textContent = "Saved: used when your first message creates this conversation.";
    delete $("system-prompt").dataset.dirty;
    return;
  }
  try {
    const updated = await api("PATCH", `/api/conversations/${state.conversation.id}/`, body);
    delete $("system-prompt").dataset.dirty;
    applyConversation({ ...state.conversation, ...updated });
    $("settings-note").textContent = "Saved.";
  } catch (err) {
    showNotice(`Could not save the settings: ${err.message}`);
  }
}

function startRename() {
  if (!state.conversation) return;
  $("rename-input").value = state.conversation.title || "";
  $("rename-form").hidden = false;
  $("conversation-title").hidden = true;
  $("rename-input").focus();
  $("rename-input").select();
}

function endRename() {
  $("rename-form").hidden = true;
  $("conversation-title").hidden = false;
}

async function submitRename(event) {
  event.preventDefault();
  const title = $("rename-input").value.trim();
  if (!title || !state.conversation) return endRename();
  try {
    const updated = await api("PATCH", `/api/conversations/${state.conversation.id}/`, { title });
    applyConversation({ ...state.conversation, ...updated, title: updated?.title ?? title });
    endRename();
  } catch (err) {
    showNotice(`Could not rename: ${err.message}`);
  }
}

function askDelete() {
  if (!state.conversation) return;
  const dialog = $("delete-dialog");
  dialog.returnValue = "";
  dialog.showModal();
}

async function onDeleteDialogClose() {
  if ($("delete-dialog").returnValue !== "confirm" || !state.conversation) return;
  try {
    await api("DELETE", `/api/conversations/${state.conversation.id}/`);
    state.leaving = true;
    location.assign(config.new_chat_url);
  } catch (err) {
    showNotice(`Could not delete: ${err.message}`);
  }
}

// --- sidebar ------------------------------------------------------------------------------------

function upsertSidebar(conversation) {
  const list = state.conversations.filter((c) => c.id !== conversation.id);
  list.unshift({ ...state.conversations.find((c) => c.id === conversation.id), ...conversation });
  list.sort((a, b) => String(b.updated_at).localeCompare(String(a.updated_at)));
  state.conversations = list;
  renderSidebar();
}

function renderSidebar() {
  const query = $("search").value.trim().toLowerCase();
  let items = state.searchResults ?? state.conversations;
  if (query && state.searchResults === null) {
    items = items.filter((c) => (c.title || "").toLowerCase().includes(query));
  }
  const list = $("conversation-list");
  list.replaceChildren(...items.map(sidebarItem));
  $("conversation-empty").hidden = items.length > 0;
  $("conversation-empty").textContent = query ? "No conversation matches." : "No conversations yet.";
}

function sidebarItem(conversation) {
  const li = document.createElement("li");
  const link = document.createElement("a");
  link.href = conversationUrl(conversation.id);
  link.className = "conversation-link";
  link.dataset.id = conversation.id;
  link.textContent = conversation.title || "Untitled";
  link.title = conversation.title || "Untitled";
  if (conversation.id === config.conversation_id) {
    link.classList.add("active");
    link.setAttribute("aria-current", "page");
  }
  li.append(link);
  return li;
}

let searchTimer = null;
let searchSerial = 0;

function onSearchInput() {
  state.searchResults = null;
  renderSidebar();  // instant filter on titles
  clearTimeout(searchTimer);
  const query = $("search").value.trim();
  if (!query) return;
  // The API also searches message text; when it is unavailable the title filter stays.
  searchTimer = setTimeout(async () => {
    const serial = ++searchSerial;
    try {
      const data = await api("GET", `/api/conversations/?search=${encodeURIComponent(query)}`);
      if (serial !== searchSerial || $("search").value.trim() !== query) return;
      state.searchResults = Array.isArray(data) ? data : (data.results || []);
      renderSidebar();
    } catch {
      /* keep the local title filter */
    }
  }, 250);
}

function setSidebarOpen(open) {
  document.body.classList.toggle("sidebar-open", open);
  $("backdrop").hidden = !open;
  $("sidebar-open").setAttribute("aria-expanded", String(open));
  if (open) $("search").focus();
}

// --- composer ---------------------------------------------------------------------------------

function autosize() {
  const input = $("input");
  input.style.height = "auto";
  input.style.height = `${Math.min(input.scrollHeight, 240)}px`;
}

const draftKey = `chat-draft:${config.conversation_id}`;

function saveDraft() {
  try {
    if ($("input").value) sessionStorage.setItem(draftKey, $("input").value);
    else sessionStorage.removeItem(draftKey);
  } catch { /* storage may be disabled */ }
}

function restoreDraft() {
  try {
    const draft = sessionStorage.getItem(draftKey);
    if (draft && !$("input").value) $("input").value = draft;
  } catch { /* storage may be disabled */ }
  autosize();
}

function onInputKeydown(event) {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    submitMessage();
  }
}

function onDocumentKeydown(event) {
  if (event.key !== "Escape") return;
  if ($("delete-dialog").open) return;
  if (!$("rename-form").hidden) { endRename(); return; }
  if (document.body.classList.contains("sidebar-open")) { setSidebarOpen(false); return; }
  if (state.streamingId) {
    event.preventDefault();
    stop();
  }
}

// --- start ------------------------------------------------------------------------------------

function bindEvents() {
  $("composer").addEventListener("submit", (event) => { event.preventDefault(); submitMessage(); });
  $("input").addEventListener("keydown", onInputKeydown);
  $("input").addEventListener("input", () => { autosize(); saveDraft(); });
  $("stop").addEventListener("click", stop);
  document.addEventListener("keydown", onDocumentKeydown);
  $("transcript").addEventListener("scroll", onTranscriptScroll, { passive: true });
  $("jump").addEventListener("click", () => scrollToEndIfFollowing(true));
  $("notice-close").addEventListener("click", hideNotice);
  $("search").addEventListener("input", onSearchInput);
  $("sidebar-open").addEventListener("click", () => setSidebarOpen(true));
  $("sidebar-close").addEventListener("click", () => setSidebarOpen(false));
  $("backdrop").addEventListener("click", () => setSidebarOpen(false));
  $("settings-toggle").addEventListener("click", () => {
    const open = $("settings").hidden;
    $("settings").hidden = !open;
    $("settings-toggle").setAttribute("aria-expanded", String(open));
  });
  $("model").addEventListener("change", () => { if (state.conversation) saveSettings(); });
  $("system-prompt").addEventListener("input", () => { $("system-prompt").dataset.dirty = "1"; });
  $("settings-save").addEventListener("click", saveSettings);
  $("rename").addEventListener("click", startRename);
  $("rename-form").addEventListener("submit", submitRename);
  $("rename-cancel").addEventListener("click", endRename);
  $("delete").addEventListener("click", askDelete);
  $("delete-dialog").addEventListener("close", onDeleteDialogClose);
  window.addEventListener("online", reconnectNow);
  window.addEventListener("offline", () => {
    if (!state.socket) setConnection("offline", "Offline");
  });
  window.addEventListener("pagehide", () => { state.leaving = true; });
  window.addEventListener("pageshow", (event) => {
    if (event.persisted) { state.leaving = false; reconnectNow(); }
  });
}

/** Hooks for the browser tests (and for trying the reconnect by hand in the console). */
window.chatDebug = {
  /** Close the socket as a lost connection would; the page reconnects with backoff. */
  dropSocket() {
    state.socket?.close(4000, "dropped for a test");
  },
  messages: () => state.messages.map((m) => ({ ...m })),
  connected: () => state.ready,
  send: (frame) => sendFrame(frame),
  /** Discard the next ``n`` delta frames as if lost in transit (tests the resync). */
  loseDeltas: (n) => { state.debugLoseDeltas = n; },
  stateFrames: () => state.stateFrames,
  /** Handle a frame as if the server had sent it (error frames). */
  inject: (frame) => handleFrame(frame),
  /** Record a send as this tab's own, as submitMessage does (to test refusals). */
  setPending: (content) => { state.pending = { type: "message", content }; },
};

bindEvents();
renderSidebar();
fillSettings();
refreshChrome();
restoreDraft();
connect();
$("input").focus();
