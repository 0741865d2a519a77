// Model text -> sanitized DOM. Model output is untrusted: it is parsed by marked and
// every byte of the result goes through DOMPurify before it reaches the document; raw
// HTML in the text is shown as text. Code blocks get highlighting and a Copy button.

import { marked } from "../vendor/marked/marked.esm.js";
import DOMPurify from "../vendor/dompurify/purify.es.mjs";
import hljs from "../vendor/highlight/highlight.min.js";
import { element } from "./page.js";

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
export function renderMarkdown(text) {
  const html = marked.parse(text || "");
  return DOMPurify.sanitize(html, { ...SANITIZE_OPTIONS, RETURN_DOM_FRAGMENT: true });
}

/** Highlight every `pre > code` in ``container`` and give it a bar with its language
 *  and a Copy button. */
export function decorateCodeBlocks(container) {
  for (const code of container.querySelectorAll("pre > code")) {
    try {
      hljs.highlightElement(code);
    } catch (err) {
      console.warn("highlight failed", err);
    }
    const pre = code.parentElement;
    pre.classList.add("code-block");
    const lang = [...code.classList].find((c) => c.startsWith("language-"));
    const bar = element("div", "code-bar");
    const label = element("span", "", lang ? lang.slice("language-".length) : "code");
    const copy = element("button", "copy-btn", "Copy");
    copy.type = "button";
    copy.setAttribute("aria-label", "Copy code");
    copy.addEventListener("click", () => copyText(code.textContent, copy));
    bar.append(label, copy);
    pre.insertBefore(bar, code);
  }
}

/** Put ``text`` on the clipboard; ``button`` says whether it worked for 1.5 s. */
export async function copyText(text, button) {
  const old = button.textContent;
  try {
    await navigator.clipboard.writeText(text);
    button.textContent = "Copied";
  } catch {
    button.textContent = "Copy failed";
  }
  setTimeout(() => { button.textContent = old; }, 1500);
}
