// The client's model of the conversation, and the two ways the views hear that it
// changed. No DOM and no socket here: protocol.js writes the model from the server's
// frames, the other modules draw it.

import { initialConversations } from "./page.js";

/** What a user message queued or in flight shows under it (`message.pending`). */
export const PENDING_NOTES = {
  sending: "Sending…",
  offline: "Offline: this message is sent when the connection is back.",
  waiting: "Waiting: an answer is still being written.",
};

export const state = {
  conversation: null,            // conversation dict, null until the first message
  // Visible message dicts, in order: the server's shape (README, "a message") plus
  // `pending`, the note of a user message this tab has not seen echoed yet, and
  // `truncated` (state frames only): its text was cut to fit the frame; it is fetched
  // whole over REST (transcript.js completeTruncated).
  messages: [],
  lastSeq: new Map(),            // message id -> seq of the last delta applied
  streamingId: null,             // id of the assistant message streaming now
  outbox: [],                    // frames typed while offline, sent after reconnect
  // What this tab asked for and has not seen answered: {type, content, frame}.
  pending: null,
  follow: true,                  // the view follows the end of the transcript
  conversations: initialConversations,  // the sidebar's list
  searchResults: null,           // null: show state.conversations
  stateFrames: 0,                // state frames received (the first one scrolls to the end)
  // Older messages exist than state.messages holds: the `state` frame carried only the
  // latest (`has_more`); the transcript loads the rest over REST (loadEarlier).
  hasMore: false,
  loadingEarlier: false,         // a page of older messages is being fetched
};

export function findMessage(id) {
  return state.messages.find((m) => m.id === id);
}

export function lastOfRole(role) {
  for (let i = state.messages.length - 1; i >= 0; i -= 1) {
    if (state.messages[i].role === role) return state.messages[i];
  }
  return null;
}

// --- change notification --------------------------------------------------------------
// Views register here instead of being imported by the code that changes the state, so
// imports go one way (the order is in main.js).

const refreshers = [];
const conversationWatchers = [];

/** Run ``fn()`` at every refresh(): a part of the page outside the message list that
 *  shows the state (Stop/Send, title, empty state, message actions). */
export function onRefresh(fn) {
  refreshers.push(fn);
}

/** Bring every part registered with onRefresh up to date. */
export function refresh() {
  for (const fn of refreshers) fn();
}

/** Run ``fn(conversation)`` whenever setConversation() is called (conversation may be
 *  null: none created yet). */
export function onConversation(fn) {
  conversationWatchers.push(fn);
}

/** The conversation changed (state frame, the title set by the first message, rename,
 *  settings, another tab): keep it, tell the watchers (sidebar, settings), refresh. */
export function setConversation(conversation) {
  if (conversation) state.conversation = conversation;
  for (const fn of conversationWatchers) fn(conversation);
  refresh();
}
