// Hooks for the browser tests (tests/test_browser.py), never part of a normal page:
// main.js imports this module only when `window.__CHAT_TEST_HOOKS__` was set before the
// page's scripts ran (Playwright's add_init_script). To try them by hand on a
// development server, import this module from the page's console and call
// installTestHooks() (docs/ui.md has the line to paste).

import { currentSocket, filterIncoming, handleFrame, isConnected, sendFrame } from "./protocol.js";
import { state } from "./state.js";

/** Define ``window.chatDebug`` (see docs/ui.md for what each hook does). */
export function installTestHooks() {
  let deltasToLose = 0;
  filterIncoming((frame) => {
    if (frame.type !== "delta" || deltasToLose === 0) return true;
    deltasToLose -= 1;  // a frame lost on the way
    return false;
  });
  window.chatDebug = {
    /** Close the socket as a lost connection would; the page reconnects with backoff. */
    dropSocket() {
      currentSocket()?.close(4000, "dropped for a test");
    },
    /** Copies of the client's message dicts (raw markdown, status, pending note). */
    messages: () => state.messages.map((m) => ({ ...m })),
    connected: () => isConnected(),
    send: (frame) => sendFrame(frame),
    /** Discard the next ``n`` delta frames as if lost in transit (tests the resync). */
    loseDeltas: (n) => { deltasToLose = n; },
    stateFrames: () => state.stateFrames,
    /** Handle a frame as if the server had sent it (error frames). */
    inject: (frame) => handleFrame(frame),
    /** Record a send as this tab's own, as submitting does (to test refusals). */
    setPending: (content) => {
      const frame = { type: "message", content };
      state.pending = { type: "message", content, frame };
    },
  };
}
