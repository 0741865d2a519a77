// This tab's socket and the protocol spoken on it (README, "WebSocket protocol"):
// connecting (ws: or wss: as the page), reconnecting with backoff, the outbox of frames
// typed while offline, and the server's frames applied to the model in state.js.
//
// Rules kept here:
// - deltas and reasoning frames (one seq series) are applied by seq, each exactly once; a gap asks the server for a fresh
//   `state` frame (`sync`) instead of ever showing text with a hole in it;
// - every `state` frame rebuilds the transcript from scratch, so a reconnect never
//   duplicates text.

import { announce, config, describeError, setConnection, showNotice } from "./page.js";
import {
  PENDING_NOTES, findMessage, lastOfRole, refresh, setConversation, state,
} from "./state.js";
import {
  STATUS_LABELS, appendMessage, completeTruncated, queueRender, removeMessages, renderMessage,
  renderTranscript, stopNotice,
} from "./transcript.js";

const RECONNECT_BASE_MS = 500;
const RECONNECT_MAX_MS = 10000;
// Close code 1012 "Service Restart" (RFC 6455 section 7.4.1, IANA): the worker is
// stopping and its answers go on elsewhere; come back at once, spread over this window.
const SERVICE_RESTART = 1012;
const RESTART_JITTER_MS = 250;
const TAB_KEY = "chat.tab";
// A run's seq when the server could not say which deltas its saved text includes.
const SEQ_UNKNOWN = -1;

const link = {
  socket: null,
  ready: false,         // the current socket has delivered its `state` frame
  syncing: false,       // a `sync` was sent; deltas wait for the `state` frame
  attempts: 0,          // failed connects since the last `state` frame (backoff exponent)
  timer: null,
  leaving: false,       // the page is going away: a close is not a lost connection
};

let incomingFilter = null;
let refusedHandler = () => false;

// --- the socket ----------------------------------------------------------------------------

/** This tab's id: kept in sessionStorage (one per tab, across reloads and reconnects)
 *  and sent with every socket, so the answer this tab started stays its own to stop by
 *  closing it, whichever worker its socket reaches (chat/tabs.py). */
function tabId() {
  let id = null;
  try { id = sessionStorage.getItem(TAB_KEY); } catch { /* storage disabled */ }
  if (!id) {
    // randomUUID needs a secure context; plain http on another host has only this.
    id = crypto.randomUUID ? crypto.randomUUID()
      : Array.from(crypto.getRandomValues(new Uint8Array(16)),
        (b) => b.toString(16).padStart(2, "0")).join("");
    try { sessionStorage.setItem(TAB_KEY, id); } catch { /* storage disabled */ }
  }
  return id;
}

function socketUrl() {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const path = config.ws_path;
  const joiner = path.includes("?") ? "&" : "?";
  return `${scheme}//${location.host}${path}${joiner}tab=${encodeURIComponent(tabId())}`;
}

function connect() {
  clearTimeout(link.timer);
  link.ready = false;
  const socket = new WebSocket(socketUrl());
  link.socket = socket;
  socket.addEventListener("message", (event) => {
    if (socket !== link.socket) return;
    let frame;
    try {
      frame = JSON.parse(event.data);
    } catch {
      console.warn("ignored a frame that is not JSON");
      return;
    }
    if (incomingFilter && !incomingFilter(frame)) return;
    handleFrame(frame);
  });
  socket.addEventListener("close", (event) => {
    if (socket !== link.socket) return;
    onSocketClosed(event);
  });
}

function onSocketClosed(event) {
  link.ready = false;
  link.socket = null;
  if (link.leaving) return;
  if (event.code === 4401) {
    location.assign(`/accounts/login/?next=${encodeURIComponent(location.pathname)}`);
    return;
  }
  if (event.code === 4403) {
    setConnection("offline", "No access");
    showNotice("This conversation belongs to someone else.");
    return;
  }
  if (event.code === SERVICE_RESTART) {
    // Not a lost connection: the server restarts and its answers stream on; the
    // `state` frame of the next socket catches the transcript up.
    link.attempts = 0;
    setConnection("offline", "Reconnecting…");
    clearTimeout(link.timer);
    link.timer = setTimeout(connect, Math.random() * RESTART_JITTER_MS);
    return;
  }
  scheduleReconnect();
}

/** Exponential backoff: 0.5 s doubling to 10 s, ±25 % jitter so tabs do not reconnect
 *  in step after a server restart. */
function scheduleReconnect() {
  const attempt = link.attempts;
  link.attempts += 1;
  const delay = Math.min(RECONNECT_MAX_MS, RECONNECT_BASE_MS * 2 ** attempt)
    * (0.75 + Math.random() * 0.5);
  setConnection("offline", `Offline · reconnecting in ${Math.ceil(delay / 1000)} s`);
  clearTimeout(link.timer);
  link.timer = setTimeout(connect, delay);
}

function reconnectNow() {
  if (link.socket || link.leaving) return;
  link.attempts = 0;
  connect();
}

/** Open the socket and follow the browser's online/offline and page-cache events. */
export function startProtocol() {
  window.addEventListener("online", reconnectNow);
  window.addEventListener("offline", () => {
    if (!link.socket) setConnection("offline", "Offline");
  });
  window.addEventListener("pagehide", () => { link.leaving = true; });
  window.addEventListener("pageshow", (event) => {
    if (event.persisted) { link.leaving = false; reconnectNow(); }
  });
  connect();
}

/** Send ``frame`` if the socket is open and has delivered its `state`; false otherwise. */
export function sendFrame(frame) {
  if (link.socket && link.ready && link.socket.readyState === WebSocket.OPEN) {
    link.socket.send(JSON.stringify(frame));
    return true;
  }
  return false;
}

/** Send a frame the user asked for (message, regenerate, edit) and remember it as this
 *  tab's pending request, so its echo, answer or refusal is recognised; false if offline. */
export function sendRequest(frame) {
  if (!sendFrame(frame)) return false;
  state.pending = { type: frame.type, content: frame.content, frame };
  return true;
}

function requestSync() {
  if (link.syncing) return;
  link.syncing = true;
  if (!sendFrame({ type: "sync" })) link.syncing = false;
}

/** Leave the page for ``url`` without the socket's close counting as a lost connection. */
export function leavePage(url) {
  link.leaving = true;
  location.assign(url);
}

/** Call ``fn(pending, frame)`` when the server refuses what this tab sent (busy, quota,
 *  ...): ``pending`` is {type, content, frame}, ``frame`` the `error` frame. It returns
 *  true when it sends the request again by itself (the message stays shown), else it
 *  gives the text back to the input. */
export function onRefused(fn) {
  refusedHandler = fn;
}

// For the test hooks (test-hooks.js), which are not loaded on a normal page.
export const isConnected = () => link.ready;
export const currentSocket = () => link.socket;
/** ``fn(frame)`` sees each frame first and drops it by returning false. */
export function filterIncoming(fn) {
  incomingFilter = fn;
}

// --- frames from the server ----------------------------------------------------------------

export function handleFrame(frame) {
  switch (frame.type) {
    case "state": return onState(frame);
    case "message": return onUserMessage(frame);
    case "generation.start": return onGenerationStart(frame);
    case "delta": return onDelta(frame);
    case "reasoning": return onDelta(frame);  // same seq series as the deltas
    case "generation.end": return onGenerationEnd(frame);
    case "error": return onError(frame);
    case "conversation": return setConversation(frame.conversation);
    case "conversation.deleted": return leavePage(config.new_chat_url);  // nothing left here
    default: console.warn("unknown frame", frame.type);
  }
}

function onState(frame) {
  state.stateFrames += 1;
  link.ready = true;
  link.syncing = false;
  link.attempts = 0;
  setConnection("online", "Online");
  state.conversation = frame.conversation;
  settlePendingMessage(frame.messages);
  // Messages this tab queued while offline stay on screen until they are sent.
  const queued = state.messages.filter((m) => m.pending);
  // The frame carries the latest messages only (`has_more`): older ones this tab loaded
  // over REST stay above them, if they join the frame's first message.
  const earlier = earlierKept(frame);
  state.messages = [...(earlier || []), ...frame.messages, ...queued];
  if (!earlier) state.hasMore = Boolean(frame.has_more);
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
  setConversation(frame.conversation);
  // A message too large for the frame came cut (`truncated`): fetch it whole. A
  // streaming one is fetched when it ends (onGenerationEnd).
  for (const m of frame.messages) completeTruncated(m);
  flushOutbox();
}

/** The older messages this tab shows before the frame's first one (loaded over REST),
 *  or null when the frame has them all or its first message is not shown here. */
function earlierKept(frame) {
  if (!frame.has_more || !frame.messages.length) return null;
  const index = state.messages.findIndex((m) => m.id === frame.messages[0].id);
  return index > 0 ? state.messages.slice(0, index).filter((m) => !m.pending) : null;
}

/** A message sent just before the socket dropped: either the server has it (it is in
 *  this state) or it never arrived and goes back to the outbox. */
function settlePendingMessage(messages) {
  if (state.pending?.type !== "message") return;
  const { content, frame } = state.pending;
  const lastUser = [...messages].reverse().find((m) => m.role === "user");
  if (!lastUser || lastUser.content !== content) {
    state.outbox.unshift(frame || { type: "message", content });
    for (const m of state.messages) {
      if (m.pending && m.content === content) m.pending = PENDING_NOTES.offline;
    }
  } else {
    state.messages = state.messages.filter((m) => !(m.pending && m.content === content));
  }
  state.pending = null;
}

/** Send the oldest queued frame, one at a time: the next would be refused as busy while
 *  this one is answered (the next `state` frame sends it). */
function flushOutbox() {
  if (!state.outbox.length) return;
  if (state.streamingId) {
    for (const m of state.messages) {
      if (m.pending) m.pending = PENDING_NOTES.waiting;
    }
    renderTranscript();
    return;
  }
  const frame = state.outbox.shift();
  if (frame.type === "message" && state.conversation) {
    // The settings travel only with the message that creates the conversation.
    delete frame.model;
    delete frame.system_prompt;
  }
  if (!sendRequest(frame)) {
    state.outbox.unshift(frame);
    return;
  }
  for (const m of state.messages) {
    if (m.pending && m.content === frame.content) m.pending = PENDING_NOTES.sending;
  }
  renderTranscript();
}

function onUserMessage(frame) {
  const mine = state.pending && state.pending.content === frame.message.content;
  if (mine && state.pending.type === "edit") {
    const old = lastOfRole("user");
    if (old) {
      const gone = new Set(state.messages.slice(state.messages.indexOf(old)).map((m) => m.id));
      removeMessages((m) => gone.has(m.id));
    }
  }
  removeMessages((m) => m.pending && m.content === frame.message.content);
  if (findMessage(frame.message.id)) return;
  appendMessage(frame.message);
  if (frame.conversation) setConversation(frame.conversation);
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
  if (!findMessage(message.id)) appendMessage({ ...message });
  refresh();
  announce("Answer started.");
}

function onDelta(frame) {
  if (link.syncing) return;  // the coming state frame includes it
  const message = findMessage(frame.message_id);
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
  applyDelta(message, frame);
  state.lastSeq.set(frame.message_id, frame.seq);
  queueRender(message.id);
}

/** One delta's text joins its message, after the seq checks above; a `reasoning`
 *  frame's joins the answer's reasoning (the "Thinking" part). */
function applyDelta(message, frame) {
  if (frame.type === "reasoning") message.reasoning = (message.reasoning || "") + frame.content;
  else message.content += frame.content;
}

function onGenerationEnd(frame) {
  const message = findMessage(frame.message_id);
  if (state.streamingId === frame.message_id) state.streamingId = null;
  if (!message) {
    requestSync();
    refresh();
    return;
  }
  // What the end frame tells about the answer; finish_reason also says whether the
  // server stopped it by itself (the notice under it, transcript.js stopNotice).
  Object.assign(message, {
    status: frame.status,
    finish_reason: frame.finish_reason,
    usage: frame.usage,
    error: frame.error,
  });
  renderMessage(message.id);
  refresh();
  if (state.lastSeq.get(message.id) === SEQ_UNKNOWN) requestSync();
  else completeTruncated(message);  // its saved text is final now
  if (frame.status === "failed") {
    showNotice(`The model failed: ${frame.error || "unknown error"}`);
  }
  announce(frame.status === "completed" ? "Answer complete."
    : stopNotice(message) ? `${stopNotice(message)}.`
    : `Answer ${STATUS_LABELS[frame.status] || frame.status}.`);
}

function onError(frame) {
  // A refused send is sent again by the composer (`overloaded`: it keeps showing), or
  // given back to the input, so the text is never lost.
  const pending = state.pending;
  state.pending = null;
  if (pending && (pending.type === "message" || pending.type === "edit")) {
    if (refusedHandler(pending, frame)) return;
    removeMessages((m) => m.pending && m.content === pending.content);
    refresh();
  }
  showNotice(describeError(frame),
    frame.code === "busy" || frame.code === "overloaded" ? "warning" : "error");
}
