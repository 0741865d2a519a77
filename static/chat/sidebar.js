// The conversation list (newest activity first, the current one highlighted), its
// search, the drawer on narrow screens, and the header's controls for this
// conversation: title, rename and delete (REST API, docs/api.md; other tabs follow
// through the `conversation` and `conversation.deleted` frames).

import { $, api, config, conversationUrl, element, showNotice } from "./page.js";
import { leavePage } from "./protocol.js";
import { onConversation, onRefresh, setConversation, state } from "./state.js";

// The API search (message text too) waits for a pause in typing; titles filter at once.
const SEARCH_DELAY_MS = 250;
let searchTimer = null;
let searchSerial = 0;

// --- the list -------------------------------------------------------------------------

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
  $("conversation-list").replaceChildren(...items.map(sidebarItem));
  $("conversation-empty").hidden = items.length > 0;
  $("conversation-empty").textContent = query ? "No conversation matches." : "No conversations yet.";
}

function sidebarItem(conversation) {
  const li = element("li");
  const link = element("a", "conversation-link", conversation.title || "Untitled");
  link.href = conversationUrl(conversation.id);
  link.dataset.id = conversation.id;
  link.title = conversation.title || "Untitled";
  if (conversation.id === config.conversation_id) {
    link.classList.add("active");
    link.setAttribute("aria-current", "page");
  }
  li.append(link);
  return li;
}

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
  }, SEARCH_DELAY_MS);
}

// --- the drawer (narrow screens) -------------------------------------------------------------

function setSidebarOpen(open) {
  document.body.classList.toggle("sidebar-open", open);
  $("backdrop").hidden = !open;
  $("sidebar-open").setAttribute("aria-expanded", String(open));
  if (open) $("search").focus();
}

/** Close the drawer if it is open; true if it was (Esc closes one thing at a time). */
export function closeDrawer() {
  if (!document.body.classList.contains("sidebar-open")) return false;
  setSidebarOpen(false);
  return true;
}

// --- title, rename, delete -------------------------------------------------------------------

function refreshHeader() {
  const title = state.conversation?.title || "New chat";
  $("conversation-title").textContent = title;
  document.title = `${title} · Chat`;
  $("rename").hidden = !state.conversation;
  $("delete").hidden = !state.conversation;
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

/** Close the rename form if it is open; true if it was. */
export function closeRename() {
  if ($("rename-form").hidden) return false;
  endRename();
  return true;
}

async function submitRename(event) {
  event.preventDefault();
  const title = $("rename-input").value.trim();
  if (!title || !state.conversation) return endRename();
  try {
    const updated = await api("PATCH", `/api/conversations/${state.conversation.id}/`, { title });
    setConversation({ ...state.conversation, ...updated, title: updated?.title ?? title });
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
    leavePage(config.new_chat_url);
  } catch (err) {
    showNotice(`Could not delete: ${err.message}`);
  }
}

export function initSidebar() {
  $("search").addEventListener("input", onSearchInput);
  $("sidebar-open").addEventListener("click", () => setSidebarOpen(true));
  $("sidebar-close").addEventListener("click", () => setSidebarOpen(false));
  $("backdrop").addEventListener("click", () => setSidebarOpen(false));
  $("rename").addEventListener("click", startRename);
  $("rename-form").addEventListener("submit", submitRename);
  $("rename-cancel").addEventListener("click", endRename);
  $("delete").addEventListener("click", askDelete);
  $("delete-dialog").addEventListener("close", onDeleteDialogClose);
  onRefresh(refreshHeader);
  onConversation((conversation) => { if (conversation) upsertSidebar(conversation); });
  renderSidebar();
}
