// The transcript: one <article class="msg"> per visible message, drawn from the model
// in state.js. User text goes in with textContent; answers are markdown, sanitized by
// markdown.js. Renders of a streaming answer are coalesced to one per animation frame,
// and the view follows the end unless the reader has scrolled up. Older messages than
// the `state` frame carried are loaded over REST at the top (scrolling up or "Load
// earlier messages"), and a message the frame carried cut (`truncated`) is fetched whole.

import { copyText, decorateCodeBlocks, renderMarkdown } from "./markdown.js";
import { $, api, config, element, showNotice } from "./page.js";
import { findMessage, lastOfRole, onRefresh, refresh, state } from "./state.js";

// Within this many pixels of the bottom the view counts as "at the end" and follows
// the stream; further up, the user is reading and is left alone.
const FOLLOW_SLACK_PX = 48;

/** The mark of an answer that did not complete, by status. */
export const STATUS_LABELS = {
  cancelled: "Stopped",
  failed: "Failed",
  interrupted: "Interrupted",
};

/** The notice under an answer the server stopped by itself, by finish_reason (the
 *  automatic stops: README, "Automatic stops"). */
export const STOP_NOTICES = {
  repetition: "Stopped: the answer was repeating itself",
  cost_limit: "Stopped: the answer reached its cost limit",
};

// Said under the mark when the server gave no error text.
const STATUS_DETAILS = {
  cancelled: "The answer was stopped; the text above is what was written before.",
  interrupted: "The server running this answer went away.",
};

const ACTION_LABELS = { "copy-answer": "Copy", regenerate: "Regenerate", edit: "Edit" };

// What the buttons under a message do, by name. composer.js registers regenerate and
// edit (they send frames), so this module needs no socket.
const actionHandlers = {
  "copy-answer": (message, button) => copyText(message.content, button),
};

const renderQueued = new Set();

// Older messages are fetched this many at a time (the REST API's `page_size`).
const EARLIER_PAGE = 50;
// Within this many pixels of the top, scrolling up loads older messages.
const EARLIER_SLACK_PX = 64;
// Ids of cut messages being fetched whole.
const completing = new Set();

// --- formatting -----------------------------------------------------------------------

function formatCost(costUsd) {
  const value = Number(costUsd);
  if (!Number.isFinite(value)) return "";
  if (value === 0) return "$0";
  if (value < 0.01) return `$${value.toFixed(6).replace(/0+$/, "")}`;
  return `$${value.toFixed(4)}`;
}

// Where the counts come from, said under the answer unless the provider reported them
// (UsageRecord.source; docs/ui.md).
const SOURCE_LABELS = {
  running: "counted by the provider when stopped",
  tokenized: "counted by the model's tokenizer",
  estimated: "estimated",
};

/** "N tokens (in · out) · $cost[ · source]" from a message's `usage` dict. */
function formatUsage(usage) {
  if (!usage) return "";
  const parts = [
    `${usage.total_tokens} tokens (${usage.prompt_tokens} in · ${usage.completion_tokens} out)`,
    formatCost(usage.cost_usd),
  ];
  // Older servers send only `estimated`.
  const source = usage.source || (usage.estimated ? "estimated" : "reported");
  if (SOURCE_LABELS[source]) parts.push(SOURCE_LABELS[source]);
  if (usage.reasoning_hidden) parts.push("hidden reasoning not counted");
  return parts.filter(Boolean).join(" · ");
}

// --- the parts of a message --------------------------------------------------------------
// A message element is this list of parts, top to bottom. Each part is made once with
// the element (make) and brought up to date from the message dict at every render
// (update, if the part changes). An answer's reasoning ("Thinking", collapsible,
// streaming like the text) goes between the role and the body.

const PARTS = [
  { className: "msg-role", make: makeRole },
  { className: "msg-thinking", make: makeThinking, update: updateThinking },
  { className: "msg-body", make: makeBody, update: updateBody },
  { className: "msg-status", make: () => element("div", "msg-status"), update: updateStatus },
  { className: "msg-notice", make: makeNotice, update: updateNotice },
  { className: "msg-meta", make: makeMeta, update: updateUsage },
];

function makeRole(message) {
  return element("div", "msg-role", message.role === "user" ? "You" : (message.model || "Assistant"));
}

function makeThinking() {
  const details = element("details", "msg-thinking");
  details.append(element("summary", "thinking-summary", "Thinking"),
    element("div", "thinking-text"));
  details.hidden = true;
  return details;
}

/** The reasoning, as plain text (textContent: provider text is untrusted). Open while
 *  the model thinks; closed when the answer starts or ends. Only a change of phase opens
 *  or closes it, so a reader's own click holds until then. */
function updateThinking(details, message) {
  const reasoning = message.role === "assistant" ? (message.reasoning || "") : "";
  details.hidden = !reasoning;
  details.querySelector(".thinking-text").textContent = reasoning;
  const phase = message.status !== "streaming" ? "done" : (message.content ? "answering" : "thinking");
  if (details.dataset.phase !== phase) {
    details.open = phase === "thinking";
    details.dataset.phase = phase;
  }
  details.querySelector(".thinking-summary").textContent =
    phase === "thinking" ? "Thinking…" : "Thinking";
}

function makeBody(message) {
  return element("div", message.role === "assistant" ? "msg-body markdown" : "msg-body plain");
}

function updateBody(body, message) {
  if (message.role !== "assistant") {
    body.textContent = message.content;
    return;
  }
  body.replaceChildren(renderMarkdown(message.content));
  decorateCodeBlocks(body);
  if (message.status === "streaming") appendCaret(body);
}

/** The blinking caret at the end of the text still being written. */
function appendCaret(body) {
  const caret = element("span", "caret");
  caret.setAttribute("aria-hidden", "true");
  let tail = body.lastElementChild || body;
  if (tail.tagName === "PRE") tail = tail.querySelector("code") || tail;
  tail.append(caret);
}

/** A queued user message's note, or the Stopped/Failed/Interrupted mark and why. */
function updateStatus(status, message) {
  status.replaceChildren();
  if (message.pending) {
    status.textContent = message.pending;
    return;
  }
  if (message.truncated) {
    // A streaming answer shows the end of its text (its deltas continue it); a finished
    // message the start, until the whole text arrives over REST.
    status.textContent = message.status === "streaming"
      ? "The start of this long answer is not shown; it is loaded when the answer ends."
      : "Loading the rest of this long message…";
    return;
  }
  const label = STATUS_LABELS[message.status];
  if (!label) return;
  status.append(element("span", `badge badge-${message.status}`, label));
  // An automatic stop says why in its own notice, below.
  const why = message.error || (stopNotice(message) ? "" : STATUS_DETAILS[message.status]);
  if (why) status.append(element("span", "status-detail", why));
}

/** The notice of an answer the server stopped by itself, or "". */
export function stopNotice(message) {
  return (message.status === "cancelled" && STOP_NOTICES[message.finish_reason]) || "";
}

function makeNotice() {
  const notice = element("div", "msg-notice");
  notice.setAttribute("role", "note");
  return notice;
}

/** Why the server stopped the answer by itself; textContent only. */
function updateNotice(notice, message) {
  notice.textContent = message.role === "assistant" ? stopNotice(message) : "";
}

function makeMeta() {
  const meta = element("div", "msg-meta");
  meta.append(element("span", "msg-usage"), element("span", "msg-actions"));
  return meta;
}

/** Tokens and cost under a finished answer. */
function updateUsage(meta, message) {
  meta.querySelector(".msg-usage").textContent =
    message.role === "assistant" && message.status !== "streaming" ? formatUsage(message.usage) : "";
}

function buildMessage(message) {
  const article = element("article", `msg msg-${message.role}`);
  article.dataset.id = message.id;
  article.append(...PARTS.map((part) => part.make(message)));
  updateMessageElement(article, message);
  return article;
}

function updateMessageElement(article, message) {
  article.dataset.status = message.status;
  article.classList.toggle("pending", Boolean(message.pending));
  if (message.role === "assistant") {
    // Screen readers wait for the whole answer instead of reading every delta.
    article.setAttribute("aria-busy", message.status === "streaming" ? "true" : "false");
  }
  for (const part of PARTS) {
    if (part.update) part.update(article.querySelector(`:scope > .${part.className}`), message);
  }
}

// --- the transcript ----------------------------------------------------------------------

export function messageElement(id) {
  return document.querySelector(`.msg[data-id="${CSS.escape(id)}"]`);
}

/** Build the whole transcript from state.messages (after a `state` frame). */
export function renderTranscript() {
  const transcript = $("transcript");
  for (const el of transcript.querySelectorAll(".msg")) el.remove();
  for (const message of state.messages) {
    if (message.role === "system") continue;
    transcript.append(buildMessage(message));
  }
  refresh();
  // The first state jumps to the end; a later one (reconnect, resync) leaves a reader
  // who scrolled up where they are.
  scrollToEndIfFollowing(state.stateFrames <= 1);
}

/** Redraw one message from its dict (a delta arrived, or the answer ended). */
export function renderMessage(id) {
  const message = findMessage(id);
  const el = messageElement(id);
  if (!message || !el) return;
  updateMessageElement(el, message);
  refreshActions();
  scrollToEndIfFollowing();
}

/** Coalesce renders of a streaming answer to one per animation frame. */
export function queueRender(id) {
  if (renderQueued.has(id)) return;
  renderQueued.add(id);
  requestAnimationFrame(() => {
    renderQueued.delete(id);
    renderMessage(id);
  });
}

/** Add a message at the end of the model and of the transcript. */
export function appendMessage(message) {
  state.messages.push(message);
  if (message.role !== "system") $("transcript").append(buildMessage(message));
  refresh();
  scrollToEndIfFollowing(message.role === "user");
}

/** Remove the messages matching ``predicate`` from the model and the transcript. */
export function removeMessages(predicate) {
  const removed = state.messages.filter(predicate);
  state.messages = state.messages.filter((m) => !predicate(m));
  for (const m of removed) messageElement(m.id)?.remove();
}

// --- actions under messages --------------------------------------------------------------

/** Make the button ``name`` ("regenerate", "edit") call ``fn(message, button)``. */
export function onMessageAction(name, fn) {
  actionHandlers[name] = fn;
}

function actionButton(name, message) {
  const button = element("button", `link-btn action-${name}`, ACTION_LABELS[name]);
  button.type = "button";
  button.addEventListener("click", () => actionHandlers[name]?.(message, button));
  return button;
}

/** Copy under every finished answer; Regenerate on the last answer and Edit on the last
 *  user message, only while nothing streams. */
function refreshActions() {
  const busy = Boolean(state.streamingId);
  const lastUser = lastOfRole("user");
  const lastAssistant = lastOfRole("assistant");
  for (const el of document.querySelectorAll(".msg")) {
    const actions = el.querySelector(".msg-actions");
    actions.replaceChildren();
    const message = findMessage(el.dataset.id);
    if (!message || message.pending) continue;
    if (message.role === "assistant" && message.status !== "streaming") {
      actions.append(actionButton("copy-answer", message));
      if (message === lastAssistant && !busy && lastUser
          && state.messages.indexOf(lastUser) < state.messages.indexOf(message)) {
        actions.append(actionButton("regenerate", message));
      }
    }
    if (message.role === "user" && message === lastUser && !busy) {
      actions.append(actionButton("edit", message));
    }
  }
}

function refreshTranscript() {
  $("empty-state").hidden = state.messages.length > 0;
  refreshActions();
  refreshEarlier();
}

// --- older messages and cut ones, over REST ----------------------------------------------

function messagesPath(suffix = "") {
  return `/api/conversations/${encodeURIComponent(config.conversation_id)}/messages/${suffix}`;
}

/** The "Load earlier messages" button at the top of the transcript (made once). */
function earlierButton() {
  let button = $("load-earlier");
  if (!button) {
    button = element("button", "link-btn load-earlier", "Load earlier messages");
    button.type = "button";
    button.id = "load-earlier";
    button.addEventListener("click", () => loadEarlier());
    $("transcript").prepend(button);
  }
  return button;
}

function refreshEarlier() {
  const button = earlierButton();
  button.hidden = !state.hasMore;
  button.disabled = state.loadingEarlier;
  button.textContent = state.loadingEarlier ? "Loading earlier messages…" : "Load earlier messages";
}

/** Fetch the page of messages before the oldest shown (`GET …/messages/?before=`, newest
 *  first) and put them above it, keeping the reader's place. */
export async function loadEarlier() {
  const oldest = state.messages.find((m) => !m.pending);
  if (!state.hasMore || state.loadingEarlier || !oldest) return;
  state.loadingEarlier = true;
  refreshEarlier();
  try {
    const page = await api("GET",
      `${messagesPath()}?before=${encodeURIComponent(oldest.id)}&page_size=${EARLIER_PAGE}`);
    // A state frame may have rebuilt the transcript meanwhile: then this page may not
    // join what is shown, and the button asks again.
    if (state.messages.find((m) => !m.pending) !== oldest) return;
    const known = new Set(state.messages.map((m) => m.id));
    prependMessages(page.results.filter((m) => !known.has(m.id)).reverse());
    state.hasMore = Boolean(page.next);
  } catch (error) {
    showNotice(`Could not load earlier messages: ${error.message}`);
  } finally {
    state.loadingEarlier = false;
    refreshEarlier();
  }
}

function prependMessages(older) {
  const t = $("transcript");
  const height = t.scrollHeight;
  const first = t.querySelector(".msg");
  state.messages = [...older, ...state.messages];
  for (const message of older) {
    if (message.role !== "system") t.insertBefore(buildMessage(message), first);
  }
  // The messages the reader was looking at stay where they were on screen.
  t.scrollTop += t.scrollHeight - height;
  refresh();
}

/** Replace a cut message's text (a `state` frame's `truncated`) by the whole of it,
 *  fetched over REST. For an answer that was streaming, call it once it has ended: the
 *  saved text is then final. */
export async function completeTruncated(message) {
  if (!message.truncated || message.status === "streaming" || completing.has(message.id)) return;
  completing.add(message.id);
  try {
    const whole = await api("GET", messagesPath(`${encodeURIComponent(message.id)}/`));
    // The model may have been rebuilt meanwhile (a state frame): update what is there.
    for (const m of new Set([message, findMessage(message.id)])) {
      if (!m) continue;
      m.content = whole.content;
      m.reasoning = whole.reasoning;
      delete m.truncated;
    }
    renderMessage(message.id);
  } catch (error) {
    showNotice(`Could not load the whole message: ${error.message}`);
  } finally {
    completing.delete(message.id);
  }
}

// --- scrolling ---------------------------------------------------------------------------

function atEnd() {
  const t = $("transcript");
  return t.scrollHeight - t.scrollTop - t.clientHeight <= FOLLOW_SLACK_PX;
}

/** Scroll to the end if the view follows it (``force``: follow it again from now on);
 *  otherwise show the "Jump to the latest" button. */
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
  if (state.hasMore && $("transcript").scrollTop <= EARLIER_SLACK_PX) loadEarlier();
}

export function initTranscript() {
  $("transcript").addEventListener("scroll", onTranscriptScroll, { passive: true });
  $("jump").addEventListener("click", () => scrollToEndIfFollowing(true));
  onRefresh(refreshTranscript);
}
