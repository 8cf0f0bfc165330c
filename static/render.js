// Model output is untrusted: Markdown -> HTML (raw HTML shown as text, images as links) ->
// DOMPurify -> the DOM. Links open in a new tab without opener or referrer; code is highlighted
// and gets a copy button. Nothing here ever runs or loads what a reply contains.

import { Marked } from "./vendor/marked.esm.js";
import DOMPurify from "./vendor/purify.es.mjs";
import hljs from "./vendor/highlight.min.js";

const escapeHtml = (text) =>
  text.replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);

const markdown = new Marked({
  gfm: true,
  breaks: false,
  renderer: {
    html({ text }) {
      return escapeHtml(text); // raw HTML in a reply is text to read, not markup
    },
    image({ href, text }) {
      const label = escapeHtml(text || "image");
      return `<a href="${escapeHtml(href || "")}">[image: ${label}]</a>`; // never loaded
    },
  },
});

const PURIFY = {
  FORBID_TAGS: ["style", "img", "svg", "math", "form", "input", "button", "textarea", "select", "iframe", "video", "audio", "source", "picture"],
  FORBID_ATTR: ["style", "srcset", "action", "formaction"],
  ALLOW_DATA_ATTR: false,
};

DOMPurify.addHook("afterSanitizeAttributes", (node) => {
  if (node.tagName === "A") {
    node.setAttribute("target", "_blank");
    node.setAttribute("rel", "noopener noreferrer");
  }
});

export function sanitizeMarkdown(text) {
  return DOMPurify.sanitize(markdown.parse(text), PURIFY);
}

// Render `text` into `element`; `final` highlights code (skipped while a reply streams in, so a
// delta costs one parse of one message).
export function renderMarkdown(element, text, { final = true } = {}) {
  element.innerHTML = sanitizeMarkdown(text);
  for (const pre of element.querySelectorAll("pre")) decorateCode(pre, final);
}

function decorateCode(pre, highlight) {
  const code = pre.querySelector("code");
  if (!code) return;
  const lang = [...code.classList].find((c) => c.startsWith("language-"))?.slice(9) || "";
  if (highlight && lang && hljs.getLanguage(lang)) {
    code.innerHTML = hljs.highlight(code.textContent, { language: lang, ignoreIllegals: true }).value;
    code.classList.add("hljs");
  }
  const bar = document.createElement("div");
  bar.className = "code-bar";
  const label = document.createElement("span");
  label.textContent = lang || "code";
  const copy = document.createElement("button");
  copy.type = "button";
  copy.className = "copy";
  copy.textContent = "Copy";
  copy.setAttribute("aria-label", `Copy ${lang || "code"}`);
  copy.addEventListener("click", () => copyText(code.textContent, copy));
  bar.append(label, copy);
  const box = document.createElement("div");
  box.className = "code";
  pre.replaceWith(box);
  box.append(bar, pre);
}

async function copyText(text, button) {
  try {
    await navigator.clipboard.writeText(text);
    button.textContent = "Copied";
  } catch {
    button.textContent = "Select and Ctrl+C";
  }
  setTimeout(() => (button.textContent = "Copy"), 1500);
}
