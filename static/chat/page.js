// What every module of the chat page shares: the data Django put in the page
// (json_script, see chat/views.py), element lookup, the notice above the transcript,
// the screen-reader announcer, the connection indicator and the REST helper.
// Untrusted text (errors, titles) only ever goes in with textContent.

function readJson(id) {
  return JSON.parse(document.getElementById(id).textContent);
}

/** The view's settings: conversation_id, ws_path, new_chat_url, conversation_url_template,
 *  demo_mode, default_model, models, default_system_prompt, max_message_chars, username. */
export const config = readJson("chat-config");

/** The user's recent conversations as the page was served: [{id, title, updated_at, ...}],
 *  newest activity first. */
export const initialConversations = readJson("chat-conversations");

export const $ = (id) => document.getElementById(id);

/** A new element with a class and, optionally, text (set as textContent, never markup). */
export function element(tag, className = "", text = null) {
  const el = document.createElement(tag);
  if (className) el.className = className;
  if (text !== null) el.textContent = text;
  return el;
}

export function conversationUrl(id) {
  return config.conversation_url_template.replace("{id}", id);
}

// --- notices, announcements, connection indicator ------------------------------------

/** Show ``text`` in the notice above the transcript; kind "error" or "warning". */
export function showNotice(text, kind = "error") {
  $("notice-text").textContent = text;
  $("notice").dataset.kind = kind;
  $("notice").hidden = false;
}

export function hideNotice() {
  $("notice").hidden = true;
}

/** Say ``text`` once through the polite status region (screen readers). */
export function announce(text) {
  $("announcer").textContent = text;
}

/** The header's indicator; kind "connecting", "online" or "offline". */
export function setConnection(kind, text) {
  const el = $("connection");
  el.dataset.state = kind;
  el.textContent = text;
  document.body.classList.toggle("offline", kind === "offline");
}

function formatWhen(value) {
  const date = new Date(value);
  if (Number.isNaN(date.getTime())) return String(value);
  return date.toLocaleString();
}

/** The notice text for an `error` frame (codes in README, "WebSocket protocol"). A quota
 *  frame shows the server's detail plus every extra field, times in local time. */
export function describeError(frame) {
  switch (frame.code) {
    case "busy":
      return "An answer is already being written in this conversation. Wait for it or press Stop.";
    case "overloaded": {
      // The server refused to start (it is past its capacity): nothing was saved, the
      // text is back in the box, and the frame says when trying again makes sense.
      const seconds = Math.max(1, Math.ceil((Number(frame.retry_after_ms) || 2000) / 1000));
      return `The server is busy with other answers right now. Your message was not sent; `
        + `it is back in the box. Try again in ${seconds} s.`;
    }
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
    default:
      return frame.detail || `Error: ${frame.code}`;
  }
}

// --- REST API (conversation settings, rename, delete, search) ---------------------------

function csrfToken() {
  const match = document.cookie.match(/(?:^|;\s*)csrftoken=([^;]+)/);
  return match ? decodeURIComponent(match[1]) : "";
}

/** Call the REST API with the session cookie (and the CSRF header when it writes).
 *  Returns the JSON body, or null for 204; throws an Error with the server's detail
 *  and ``.status`` on a 4xx/5xx. */
export async function api(method, path, body) {
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

// --- the demo model notice ----------------------------------------------------------------

const DEMO_BANNER_KEY = "chat.demoBannerDismissed";

/** Whether this browser dismissed the demo notice (localStorage; a browser that refuses
 *  storage, e.g. with site data blocked, shows it on every page). */
function demoBannerDismissed() {
  try {
    return localStorage.getItem(DEMO_BANNER_KEY) === "1";
  } catch {
    return false;
  }
}

// Runs once, when main.js first imports this module (after the page is parsed: module
// scripts are deferred). The notice is in the page only with the demo model.
const demoBanner = $("demo-banner");
if (demoBanner) {
  if (demoBannerDismissed()) {
    demoBanner.remove();
  } else {
    $("demo-banner-close").addEventListener("click", () => {
      try {
        localStorage.setItem(DEMO_BANNER_KEY, "1");
      } catch { /* not remembered: it comes back on the next page */ }
      demoBanner.remove();
      $("input").focus();
    });
  }
}
