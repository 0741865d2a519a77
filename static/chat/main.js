// The chat page's entry point (templates/chat/chat.html loads it as a module): wires the
// modules together and opens the socket. No build step; docs/ui.md has the module map.
//
// Imports go one way, down this list. A module that must hear of something done further
// down registers a function there instead of being imported by it (onRefresh and
// onConversation in state.js, onMessageAction in transcript.js, onRefused in protocol.js).
//   main.js                   wiring, Esc, the test hooks when asked for
//   composer.js, sidebar.js   what the user does
//   protocol.js               the socket and the server's frames
//   transcript.js             drawing messages
//   markdown.js, state.js     sanitized markdown; the client's model
//   page.js                   config, notices, REST helper

import { closeRename, closeDrawer, initSidebar } from "./sidebar.js";
import { initComposer, stop } from "./composer.js";
import { $ } from "./page.js";
import { startProtocol } from "./protocol.js";
import { refresh, state } from "./state.js";
import { initTranscript } from "./transcript.js";

/** Esc closes one thing at a time (the rename form, then the drawer), then stops the
 *  answer; the delete dialog and the edit form handle their own Esc. */
function onDocumentKeydown(event) {
  if (event.key !== "Escape") return;
  if ($("delete-dialog").open) return;
  if (closeRename() || closeDrawer()) return;
  if (state.streamingId) {
    event.preventDefault();
    stop();
  }
}

async function start() {
  initTranscript();
  initSidebar();
  initComposer();
  document.addEventListener("keydown", onDocumentKeydown);
  refresh();
  // Test hooks only when a test asked for them before the page loaded (docs/ui.md); they
  // are installed before the socket opens, so they exist once the page shows Online.
  if (window.__CHAT_TEST_HOOKS__) {
    const { installTestHooks } = await import("./test-hooks.js");
    installTestHooks();
  }
  startProtocol();
  $("input").focus();
}

start();
