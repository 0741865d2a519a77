// What the user does to the conversation: the message box (Enter sends, Shift+Enter adds
// a line, the draft kept in sessionStorage), Send, Stop (Esc is wired in main.js),
// Regenerate, Edit of the last user message, and the model and system prompt.

import { $, api, config, element, hideNotice, showNotice } from "./page.js";
import { onRefused, sendFrame, sendRequest } from "./protocol.js";
import { PENDING_NOTES, onConversation, onRefresh, setConversation, state } from "./state.js";
import { appendMessage, messageElement, onMessageAction, renderMessage } from "./transcript.js";

const MAX_INPUT_HEIGHT_PX = 240;
// Stop is disabled this long after a click, so a double click sends one stop.
const STOP_COOLDOWN_MS = 1000;
const draftKey = `chat-draft:${config.conversation_id}`;
// A message refused as `overloaded` (the server is past its capacity, or restarting) is
// sent again by itself after the frame's retry_after_ms, times 1 to 1.5 at random (tabs
// refused together do not all come back together), this many times before its text
// goes back to the box.
const OVERLOAD_RETRIES = 4;
const WAITING_FOR_SLOT = "Waiting for a free slot…";
const overload = { retries: 0, timer: null };

// --- the message box -------------------------------------------------------------------

function autosize() {
  const input = $("input");
  input.style.height = "auto";
  input.style.height = `${Math.min(input.scrollHeight, MAX_INPUT_HEIGHT_PX)}px`;
}

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

/** Text the server refused goes back to the input, unless the user typed something new. */
function giveBack(content) {
  if (!$("input").value.trim()) $("input").value = content;
  autosize();
}

/** The note under this tab's unsent message ``content`` (state.PENDING_NOTES or ours). */
function notePending(content, note) {
  for (const m of state.messages) {
    if (m.pending && m.content === content) {
      m.pending = note;
      renderMessage(m.id);
    }
  }
}

/** A refused request (protocol.js onRefused): an `overloaded` message or edit is sent
 *  again by itself, a few times (true: it stays shown, "waiting for a free slot…");
 *  any other refusal, or the last one, gives the text back to the input (false). */
function onRefusedRequest(pending, frame) {
  if (frame.code === "overloaded" && overload.retries < OVERLOAD_RETRIES && pending.frame) {
    overload.retries += 1;
    const hint = Number(frame.retry_after_ms) > 0 ? Number(frame.retry_after_ms) : 2000;
    notePending(pending.content, WAITING_FOR_SLOT);
    showNotice(`The server is busy: ${WAITING_FOR_SLOT.toLowerCase()}`, "warning");
    overload.timer = setTimeout(() => resend(pending), hint * (1 + Math.random() / 2));
    return true;
  }
  overload.retries = 0;
  giveBack(pending.content);
  return false;
}

function resend(pending) {
  overload.timer = null;
  hideNotice();
  if (sendRequest(pending.frame)) {
    notePending(pending.content, PENDING_NOTES.sending);
  } else {
    state.outbox.push(pending.frame);
    notePending(pending.content, PENDING_NOTES.offline);
  }
}

// --- sending ----------------------------------------------------------------------------

function messageFrame(content) {
  const frame = { type: "message", content };
  if (!state.conversation) {
    // The first message creates the conversation with the settings chosen here.
    frame.model = $("model").value || config.default_model;
    frame.system_prompt = $("system-prompt").value;
  }
  return frame;
}

/** A user message shown at once, before the server echoes it (`pending` is its note). */
function localUserMessage(content, note) {
  return {
    id: `local-${Date.now()}-${Math.random().toString(16).slice(2)}`,
    role: "user",
    content,
    status: "completed",
    pending: note,
  };
}

function submitMessage() {
  const input = $("input");
  const content = input.value.trim();
  if (!content) return;
  if (state.streamingId) {
    showNotice("Wait for the answer to finish, or press Stop.", "warning");
    return;
  }
  if (overload.timer !== null) {
    showNotice(`Your last message is still ${WAITING_FOR_SLOT.toLowerCase()}`, "warning");
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
  overload.retries = 0;
  const frame = messageFrame(content);
  if (sendRequest(frame)) {
    appendMessage(localUserMessage(content, PENDING_NOTES.sending));
  } else {
    state.outbox.push(frame);
    appendMessage(localUserMessage(content, PENDING_NOTES.offline));
  }
}

/** Stop the answer being written (whichever tab started it). */
export function stop() {
  if (!state.streamingId) return;
  if (!sendFrame({ type: "stop" })) {
    // A run started from this tab was already stopped by the disconnect itself.
    showNotice("Offline: Stop needs the connection; reconnecting…", "warning");
    return;
  }
  $("stop").disabled = true;
  setTimeout(() => { $("stop").disabled = false; }, STOP_COOLDOWN_MS);
}

function regenerate() {
  if (state.streamingId) return;
  if (!sendRequest({ type: "regenerate" })) {
    showNotice("Offline: try again when the connection is back.", "warning");
    return;
  }
  hideNotice();
}

// --- editing the last user message ------------------------------------------------------

function editForm(message) {
  const form = element("form", "edit-form");
  const area = element("textarea");
  area.value = message.content;
  area.rows = Math.min(10, message.content.split("\n").length + 1);
  area.setAttribute("aria-label", "Edit your message");
  const save = element("button", "btn btn-primary btn-small", "Save & send");
  save.type = "submit";
  const cancel = element("button", "btn btn-ghost btn-small", "Cancel");
  cancel.type = "button";
  const buttons = element("div", "edit-actions");
  buttons.append(cancel, save);
  form.append(area, buttons);
  return { form, area, cancel };
}

/** Replace the message's text by a form; Save & send (or Enter) sends an `edit` frame. */
function startEdit(message) {
  const el = messageElement(message.id);
  if (!el || el.querySelector(".edit-form")) return;
  const body = el.querySelector(".msg-body");
  const { form, area, cancel } = editForm(message);
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
    if (!sendRequest({ type: "edit", content })) {
      showNotice("Offline: your edit is kept here; send it when the connection is back.", "warning");
      return;
    }
    close();
  });
}

// --- model and system prompt ------------------------------------------------------------

/** Show the conversation's model and system prompt (the defaults before it exists),
 *  leaving alone a field the user is editing. */
function fillSettings() {
  const select = $("model");
  const current = state.conversation?.model || config.default_model;
  const models = [...config.models];
  if (current && !models.includes(current)) models.push(current);
  if (select.options.length !== models.length || document.activeElement !== select) {
    select.replaceChildren(...models.map((name) => {
      const option = element("option", "", name);
      option.value = name;
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

/** Before the first message the settings wait for it; afterwards PATCH the conversation. */
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
    setConversation({ ...state.conversation, ...updated });
    $("settings-note").textContent = "Saved.";
  } catch (err) {
    showNotice(`Could not save the settings: ${err.message}`);
  }
}

function toggleSettings() {
  const open = $("settings").hidden;
  $("settings").hidden = !open;
  $("settings-toggle").setAttribute("aria-expanded", String(open));
}

// --- wiring -------------------------------------------------------------------------------

function refreshComposer() {
  const streaming = Boolean(state.streamingId);
  $("stop").hidden = !streaming;
  $("send").hidden = streaming;
}

export function initComposer() {
  $("composer").addEventListener("submit", (event) => { event.preventDefault(); submitMessage(); });
  $("input").addEventListener("keydown", onInputKeydown);
  $("input").addEventListener("input", () => { autosize(); saveDraft(); });
  $("stop").addEventListener("click", stop);
  $("settings-toggle").addEventListener("click", toggleSettings);
  $("model").addEventListener("change", () => { if (state.conversation) saveSettings(); });
  $("system-prompt").addEventListener("input", () => { $("system-prompt").dataset.dirty = "1"; });
  $("settings-save").addEventListener("click", saveSettings);
  onRefresh(refreshComposer);
  onConversation(() => fillSettings());
  onMessageAction("regenerate", () => regenerate());
  onMessageAction("edit", (message) => startEdit(message));
  onRefused(onRefusedRequest);
  fillSettings();
  restoreDraft();
}
