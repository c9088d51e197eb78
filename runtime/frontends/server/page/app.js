// The chat page of `qwen35 serve`. Conversations live on the server (/v1/conversations, in the
// journal `qwen35 run --resume` reads); this page shows them and sends messages. Everything a model
// or a file name brings is shown as text or through DOMPurify, never as raw HTML.
import { marked } from "./vendor/marked.esm.js";
import DOMPurify from "./vendor/purify.es.js";
import hljs from "./vendor/highlight.min.js";

const KEY = "qwen35.apiKey";
const SETTINGS = "qwen35.settings";
const THINK = "qwen35.think";
const FIELDS = ["temperature", "top_p", "top_k", "min_p", "presence_penalty", "repeat_penalty", "max_tokens", "seed"];

const $ = (id) => document.getElementById(id);
const state = {
  model: null,            // {id, vision, n_ctx, thinks}
  conversations: [],      // summaries, the latest updated first
  current: null,          // the open conversation: {id, title, messages, pending, …} or null (a new chat)
  turn: null,             // the reply under way: {id, controller, stopping}
  attachments: [],        // images for the next message: {name, data}
};

// --- rendering model output safely ------------------------------------------------------------

DOMPurify.addHook("afterSanitizeAttributes", (node) => {
  if (node.tagName === "A" && node.hasAttribute("href")) {
    node.setAttribute("target", "_blank");
    node.setAttribute("rel", "noopener noreferrer");
  }
  // A reply's images load nothing: the page fetches only from this server, and only what it asks for.
  if (node.tagName === "IMG" && !/^data:image\//i.test(node.getAttribute("src") || "")) node.removeAttribute("src");
});
const PURIFY = { USE_PROFILES: { html: true }, FORBID_TAGS: ["style", "form", "input", "button", "textarea", "select"],
                 FORBID_ATTR: ["style"] };

/** Markdown → sanitized HTML, with code highlighted and a copy button on each block. */
export function renderMarkdown(element, text) {
  element.innerHTML = DOMPurify.sanitize(marked.parse(text, { gfm: true, breaks: false, async: false }), PURIFY);
  for (const code of element.querySelectorAll("pre > code")) {
    const language = [...code.classList].find((c) => c.startsWith("language-"))?.slice(9);
    if (!language || hljs.getLanguage(language)) {
      try { hljs.highlightElement(code); } catch { /* left plain */ }
    }
    const copy = button("Copy", "copy-code", () => copyText(code.textContent, copy));
    code.parentElement.append(copy);
  }
}

function button(label, className, onClick, title) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = label;
  if (className) b.className = className;
  if (title) b.title = title;
  b.addEventListener("click", onClick);
  return b;
}

function el(tag, className, text) {
  const e = document.createElement(tag);
  if (className) e.className = className;
  if (text !== undefined) e.textContent = text;
  return e;
}

async function copyText(text, feedback) {
  try {
    await navigator.clipboard.writeText(text);
  } catch {  // no clipboard API over plain http from another machine: the old way
    const area = el("textarea");
    area.value = text;
    document.body.append(area);
    area.select();
    document.execCommand("copy");
    area.remove();
  }
  const label = feedback.textContent;
  feedback.textContent = "Copied";
  setTimeout(() => { feedback.textContent = label; }, 1200);
}

// --- the API ------------------------------------------------------------------------------------

class ApiError extends Error {}

function headers(json) {
  const h = json ? { "Content-Type": "application/json" } : {};
  const key = localStorage.getItem(KEY);
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

/** fetch with the key; asks for the key (again) on 401. Returns the Response. */
async function call(path, { method = "GET", body, signal } = {}) {
  for (;;) {
    const response = await fetch(path, { method, signal, headers: headers(body !== undefined),
                                         body: body === undefined ? undefined : JSON.stringify(body) });
    if (response.status !== 401) return response;
    const message = (await response.json().catch(() => ({})))?.error?.message;
    await askKey(localStorage.getItem(KEY) ? message || "That key was refused." : null);
  }
}

async function api(path, options) {
  const response = await call(path, options);
  const data = await response.json().catch(() => null);
  if (!response.ok) throw new ApiError(data?.error?.message || `${response.status} ${response.statusText}`);
  return data;
}

function askKey(problem) {
  const dialog = $("key-dialog");
  $("key-error").hidden = !problem;
  $("key-error").textContent = problem || "";
  $("key-input").value = "";
  return new Promise((resolve) => {
    $("key-form").onsubmit = (event) => {
      event.preventDefault();
      const key = $("key-input").value.trim();
      if (!key) return;
      localStorage.setItem(KEY, key);
      $("forget-key").hidden = false;
      dialog.close();
      resolve();
    };
    dialog.addEventListener("cancel", (event) => event.preventDefault(), { once: true });
    if (!dialog.open) dialog.showModal();
    $("key-input").focus();
  });
}

// --- conversations --------------------------------------------------------------------------

async function loadList() {
  const list = await api("/v1/conversations");
  state.model = list.model;
  state.conversations = list.data;
  $("model-name").textContent = list.model.id;
  $("model-name").title = `${list.model.id} · ${list.model.n_ctx}-token context${list.model.vision ? " · sees images" : ""}`;
  $("attach").hidden = !list.model.vision;
  if (localStorage.getItem(THINK) === null) $("think").checked = list.model.thinks;
  renderList();
}

function renderList() {
  const query = $("search").value.trim().toLowerCase();
  const ul = $("conversation-list");
  ul.replaceChildren();
  for (const c of state.conversations) {
    if (query && !c.title.toLowerCase().includes(query)) continue;
    const li = el("li");
    li.dataset.id = c.id;
    if (state.current?.id === c.id) li.classList.add("current");
    const open = button(c.title, "open-conversation", () => openConversation(c.id), c.updated ? `updated ${c.updated.replace("T", " ")}` : "");
    const rename = button("✎", "icon rename", () => startRename(li, c), "Rename");
    const remove = button("×", "icon delete", () => deleteConversation(c), "Delete");
    li.append(open, rename, remove);
    ul.append(li);
  }
}

function startRename(li, c) {
  const input = el("input");
  input.value = c.title;
  input.setAttribute("aria-label", "New title");
  li.replaceChildren(input);
  input.focus();
  input.select();
  let done = false;
  const finish = async (save) => {
    if (done) return;
    done = true;
    if (save && input.value.trim() && input.value.trim() !== c.title) {
      try {
        const updated = await api(`/v1/conversations/${c.id}`, { method: "PATCH", body: { title: input.value } });
        Object.assign(c, updated);
        if (state.current?.id === c.id) { state.current.title = updated.title; $("title").textContent = updated.title; }
      } catch (e) { showError(e.message); }
    }
    renderList();
  };
  input.addEventListener("keydown", (event) => {
    if (event.key === "Enter") finish(true);
    if (event.key === "Escape") finish(false);
  });
  input.addEventListener("blur", () => finish(true));
}

async function deleteConversation(c) {
  if (!confirm(`Delete “${c.title}”? It is removed from this server for good.`)) return;
  try {
    await api(`/v1/conversations/${c.id}`, { method: "DELETE" });
  } catch (e) { return showError(e.message); }
  state.conversations = state.conversations.filter((x) => x.id !== c.id);
  if (state.current?.id === c.id) newChat();
  renderList();
}

async function openConversation(id) {
  closeSidebar();
  if (state.turn) return showError("Wait for the reply to end (or stop it) first.");
  try {
    state.current = await api(`/v1/conversations/${id}`);
  } catch (e) {
    showError(e.message);
    return newChat();
  }
  history.replaceState(null, "", `#/c/${id}`);
  showError(null);
  renderConversation();
  renderList();
}

function newChat() {
  closeSidebar();
  if (state.turn) return;
  state.current = null;
  history.replaceState(null, "", "#");
  renderConversation();
  renderList();
  $("input").focus();
}

// --- the conversation -------------------------------------------------------------------------

const imageUrls = new Map();  // "conversation/image" → blob: URL (fetched with the key)

async function imageUrl(conversationId, imageId) {
  const key = `${conversationId}/${imageId}`;
  if (!imageUrls.has(key)) {
    const response = await call(`/v1/conversations/${conversationId}/images/${imageId}`);
    imageUrls.set(key, response.ok ? URL.createObjectURL(await response.blob()) : "");
  }
  return imageUrls.get(key);
}

function textOf(content) {
  if (typeof content === "string") return content;
  return (content || []).filter((p) => p.type === "text").map((p) => p.text).join("");
}

function renderConversation() {
  const c = state.current;
  $("title").textContent = c ? c.title : "New chat";
  document.title = c ? `${c.title} · qwen35` : "qwen35";
  $("export").disabled = !c;
  const box = $("messages");
  box.replaceChildren();
  const messages = c ? c.messages : [];
  if (!messages.length && !c?.pending) {
    box.append(el("p", "empty", state.model ? `Chat with ${state.model.id}` : ""));
    return;
  }
  const lastUser = messages.map((m) => m.role).lastIndexOf("user");
  messages.forEach((m, i) => {
    if (m.role === "user") box.append(userMessage(m, i, { answered: i !== messages.length - 1 || !!c.pending }));
    else if (m.role === "assistant") box.append(assistantMessage(m, { last: i === messages.length - 1 && i > lastUser }));
  });
  if (c.pending) {
    const pending = typeof c.pending === "string" ? { text: c.pending, images: [] } : c.pending;
    const content = [...(pending.images || []).map((p) => ({ type: "image", image: p.image })), { type: "text", text: pending.text || "" }];
    box.append(userMessage({ role: "user", content }, -1, { answered: false, pending: true }));
  }
  box.scrollTop = box.scrollHeight;
}

function userMessage(m, index, { answered, pending = false }) {
  const div = el("div", "message user");
  const parts = Array.isArray(m.content) ? m.content : [];
  const images = parts.filter((p) => p.type === "image" || p.type === "video");
  if (images.length) {
    const row = el("div", "images");
    for (const part of images) {
      const figure = el("figure");
      const name = part.name || (part.path ? part.path.split("/").pop() : part.type);
      if (part.type === "image" && (part.local || (part.image && state.current))) {
        const img = el("img");
        img.alt = name;  // an attribute set as text: never parsed as HTML
        if (part.local) img.src = part.local;  // just attached: the page's own copy, until the server's
        else imageUrl(state.current.id, part.image).then((url) => { if (url) img.src = url; });
        figure.append(img);
      }
      figure.append(el("figcaption", "", name));
      row.append(figure);
    }
    div.append(row);
  }
  const bubble = el("div", "bubble", textOf(m.content));
  div.append(bubble);
  const actions = el("div", "actions");
  if (pending || !answered) actions.append(el("span", "note", "not answered"));
  if (!state.turn) {
    if (!pending && index >= 0) actions.append(button("Edit", "edit", () => startEdit(div, m, index)));
    if (!answered) actions.append(button("Answer", "regenerate", () => send({ regenerate: true })));
  }
  actions.append(button("Copy", "copy", (event) => copyText(textOf(m.content), event.target)));
  div.append(actions);
  return div;
}

function startEdit(div, m, index) {
  const area = el("textarea");
  area.value = textOf(m.content);
  area.setAttribute("aria-label", "Edit the message");
  const actions = el("div", "actions");
  actions.append(button("Cancel", "", () => renderConversation()),
                 button("Send", "primary save-edit", () => { if (area.value.trim()) send({ content: area.value, edit: index }); }));
  div.querySelector(".bubble").replaceWith(area);
  div.querySelector(".actions").replaceWith(actions);
  area.focus();
}

function assistantMessage(m, { last, streaming = false }) {
  const div = el("div", "message assistant");
  const details = el("details", "reasoning");
  details.append(el("summary", "", "Reasoning"), el("div", "reasoning-text", m.reasoning_content || ""));
  details.hidden = !m.reasoning_content;
  details.open = streaming;
  const content = el("div", "content");
  renderMarkdown(content, m.content || "");
  const actions = el("div", "actions");
  const figures = el("span", "figures", figuresText(m.stats));
  actions.append(button("Copy", "copy", (event) => copyText(content.dataset.raw ?? m.content ?? "", event.target)));
  if (last && !state.turn) actions.append(button("Regenerate", "regenerate", () => send({ regenerate: true })));
  actions.append(figures);
  div.append(details, content, actions);
  return div;
}

function figuresText(stats) {
  if (!stats) return "";
  const bits = [];
  if (stats.gen_tokens != null) bits.push(`${stats.gen_tokens} tokens`);
  if (stats.gen_tps) bits.push(`${stats.gen_tps.toFixed(1)} tokens/s`);
  if (stats.ttft_s != null) bits.push(`first token ${stats.ttft_s.toFixed(2)} s`);
  if (stats.cached_tokens != null) bits.push(`${stats.cached_tokens + (stats.prefilled_tokens || 0)} reused from the cache, ${stats.prompt_tokens} evaluated`);
  if (stats.finish_reason && stats.finish_reason !== "stop") bits.push(stats.finish_reason === "interrupted" ? "stopped" : `ended: ${stats.finish_reason}`);
  return bits.join(" · ");
}

// --- sending ------------------------------------------------------------------------------------

function settings() {
  try { return JSON.parse(localStorage.getItem(SETTINGS)) || {}; } catch { return {}; }
}

/** Send a message ({content}), an edit ({content, edit}) or ask for the last reply again ({regenerate}). */
async function send({ content, edit, regenerate }) {
  if (state.turn) return;
  showError(null);
  const images = edit === undefined && !regenerate ? state.attachments.map(({ name, data }) => ({ name, data })) : [];
  const body = { think: $("think").checked };
  if (regenerate) body.regenerate = true;
  else Object.assign(body, { content, images }, edit === undefined ? {} : { edit });
  const saved = settings();
  for (const name of FIELDS) if (saved[name] !== undefined && saved[name] !== "") body[name] = Number(saved[name]);
  if (saved.system) body.system = saved.system;

  const turn = { controller: new AbortController(), stopping: false };
  state.turn = turn;
  setReplying(true);
  try {
    if (!state.current) {
      const created = await api("/v1/conversations", { method: "POST", body: {} });
      state.current = { ...created, messages: [], pending: null };
      state.conversations.unshift(created);
      history.replaceState(null, "", `#/c/${created.id}`);
    }
    turn.id = state.current.id;
    // What the page shows while the reply comes: the conversation as the server will keep it.
    const c = state.current;
    if (regenerate) {
      if (c.pending) {
        c.messages.push({ role: "user", content: typeof c.pending === "string" ? c.pending : c.pending.text });
      }
      while (c.messages.length && c.messages.at(-1).role === "assistant") c.messages.pop();
    } else {
      if (edit !== undefined) c.messages.splice(edit);
      else if (c.pending) c.messages.push({ role: "user", content: typeof c.pending === "string" ? c.pending : c.pending.text });
      const parts = images.map((i) => ({ type: "image", image: "", name: i.name, local: i.data }));
      c.messages.push({ role: "user", content: parts.length ? [...parts, { type: "text", text: content }] : content });
    }
    c.pending = null;
    if (edit === undefined && !regenerate) {
      $("input").value = "";
      autosize();
      state.attachments = [];
      renderAttachments();
    }
    renderConversation();
    const reply = assistantMessage({ content: "" }, { last: true, streaming: true });
    reply.querySelector(".content").classList.add("cursor");
    $("messages").append(reply);
    await stream(turn, body, reply);
  } catch (e) {
    if (!(e instanceof DOMException && e.name === "AbortError")) showError(e.message);
    if (edit === undefined && !regenerate && content && !$("input").value) $("input").value = content;  // not lost
  } finally {
    state.turn = null;
    setReplying(false);
    if (state.current?.id) {
      try {
        const fresh = await api(`/v1/conversations/${state.current.id}`);
        const summary = state.conversations.find((x) => x.id === fresh.id);
        if (summary) Object.assign(summary, { title: fresh.title, updated: fresh.updated, messages: fresh.messages.length });
        state.conversations.sort((a, b) => (b.updated || "").localeCompare(a.updated || ""));
        if (state.current?.id === fresh.id) state.current = fresh;
      } catch { /* shown as it was */ }
      renderConversation();
      renderList();
    }
  }
}

async function stream(turn, body, reply) {
  const response = await call(`/v1/conversations/${turn.id}/messages`, { method: "POST", body, signal: turn.controller.signal });
  if (!response.ok) {
    const data = await response.json().catch(() => null);
    throw new ApiError(data?.error?.message || `${response.status} ${response.statusText}`);
  }
  const reasoningBox = reply.querySelector(".reasoning");
  const reasoningText = reply.querySelector(".reasoning-text");
  const contentBox = reply.querySelector(".content");
  let reasoning = "", content = "", scheduled = false;
  const paint = () => {
    scheduled = false;
    const box = $("messages");
    const atBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 80;
    reasoningText.textContent = reasoning;
    reasoningBox.hidden = !reasoning;
    renderMarkdown(contentBox, content);
    contentBox.dataset.raw = content;
    if (atBottom) box.scrollTop = box.scrollHeight;
  };
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new ApiError(chunk.error.message);
        if (chunk.object === "qwen35.turn") {
          reply.querySelector(".figures").textContent = figuresText(chunk.stats);
          continue;
        }
        const delta = chunk.choices?.[0]?.delta;
        if (!delta) continue;
        if (delta.reasoning_content) reasoning += delta.reasoning_content;
        if (delta.content) {
          if (!content && reasoning) reasoningBox.open = false;  // the answer has begun: fold the reasoning
          content += delta.content;
        }
        if (!scheduled) { scheduled = true; requestAnimationFrame(paint); }
      }
    }
  }
  paint();
  contentBox.classList.remove("cursor");
}

async function stop() {
  const turn = state.turn;
  if (!turn || turn.stopping) return;
  turn.stopping = true;
  $("stop").disabled = true;
  try {  // the server stops the reply and keeps what was written; the stream then ends by itself
    await api(`/v1/conversations/${turn.id}/stop`, { method: "POST", body: {} });
  } catch {
    turn.controller.abort();
  }
}

function setReplying(replying) {
  $("send").hidden = replying;
  $("stop").hidden = !replying;
  $("stop").disabled = false;
  $("new-chat").disabled = replying;
}

function showError(message) {
  $("error").hidden = !message;
  $("error").textContent = message || "";
}

// --- attachments ----------------------------------------------------------------------------

function addFiles(files) {
  if (!state.model?.vision) return showError(`${state.model?.id || "This model"} has no vision tower (mmproj): it cannot see images.`);
  for (const file of files) {
    if (!file.type.startsWith("image/")) { showError(`${file.name} is not an image`); continue; }
    const reader = new FileReader();
    reader.onload = () => {
      state.attachments.push({ name: file.name || "pasted image", data: reader.result });
      renderAttachments();
    };
    reader.readAsDataURL(file);
  }
}

function renderAttachments() {
  const box = $("attachments");
  box.replaceChildren();
  state.attachments.forEach((a, i) => {
    const chip = el("div", "attachment");
    const img = el("img");
    img.src = a.data;
    img.alt = "";
    chip.append(img, el("span", "", a.name), button("×", "remove-attachment", () => {
      state.attachments.splice(i, 1);
      renderAttachments();
    }, "Remove"));
    chip.title = a.name;
    box.append(chip);
  });
}

// --- the rest of the page ---------------------------------------------------------------------

function autosize() {
  const input = $("input");
  input.style.height = "auto";
  input.style.height = `${input.scrollHeight + 2}px`;
}

function openSidebar() { $("app").classList.add("sidebar-open"); $("scrim").hidden = false; }
function closeSidebar() { $("app").classList.remove("sidebar-open"); $("scrim").hidden = true; }

function openSettings() {
  const form = $("settings-form");
  const saved = settings();
  for (const name of [...FIELDS, "system"]) form.elements[name].value = saved[name] ?? "";
  $("forget-key").hidden = !localStorage.getItem(KEY);
  $("settings").showModal();
}

function saveSettings() {
  const form = $("settings-form");
  const saved = {};
  for (const name of [...FIELDS, "system"]) {
    const value = form.elements[name].value.trim();
    if (value !== "") saved[name] = value;
  }
  localStorage.setItem(SETTINGS, JSON.stringify(saved));
}

async function exportConversation() {
  if (!state.current) return;
  try {
    const response = await call(`/v1/conversations/${state.current.id}/export`);
    if (!response.ok) throw new ApiError(`${response.status} ${response.statusText}`);
    const url = URL.createObjectURL(await response.blob());
    const a = el("a");
    a.href = url;
    a.download = `${state.current.title.replace(/[^\w.-]+/g, "-").slice(0, 60) || "conversation"}.json`;
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10000);
  } catch (e) { showError(e.message); }
}

function wire() {
  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = $("input").value;
    if (text.trim() || state.attachments.length) send({ content: text });
  });
  $("input").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing && !matchMedia("(pointer: coarse)").matches) {
      event.preventDefault();
      $("composer").requestSubmit();
    }
  });
  $("input").addEventListener("input", autosize);
  $("stop").addEventListener("click", stop);
  $("new-chat").addEventListener("click", newChat);
  $("search").addEventListener("input", renderList);
  $("toggle-sidebar").addEventListener("click", openSidebar);
  $("scrim").addEventListener("click", closeSidebar);
  $("export").addEventListener("click", exportConversation);
  $("open-settings").addEventListener("click", openSettings);
  $("settings").addEventListener("close", () => { if ($("settings").returnValue === "save") saveSettings(); });
  $("forget-key").addEventListener("click", () => { localStorage.removeItem(KEY); $("forget-key").hidden = true; });
  $("think").checked = localStorage.getItem(THINK) === "true";
  $("think").addEventListener("change", () => localStorage.setItem(THINK, String($("think").checked)));
  $("attach").addEventListener("click", () => $("file").click());
  $("file").addEventListener("change", () => { addFiles($("file").files); $("file").value = ""; });
  document.addEventListener("paste", (event) => {
    const files = [...(event.clipboardData?.files || [])].filter((f) => f.type.startsWith("image/"));
    if (files.length) { event.preventDefault(); addFiles(files); }
  });
  const chat = $("chat");
  let depth = 0;
  chat.addEventListener("dragenter", (event) => {
    if (![...event.dataTransfer.types].includes("Files")) return;
    depth++;
    $("drop-hint").hidden = false;
  });
  chat.addEventListener("dragleave", () => { if (--depth <= 0) { depth = 0; $("drop-hint").hidden = true; } });
  chat.addEventListener("dragover", (event) => event.preventDefault());
  chat.addEventListener("drop", (event) => {
    event.preventDefault();
    depth = 0;
    $("drop-hint").hidden = true;
    addFiles(event.dataTransfer.files);
  });
}

async function start() {
  wire();
  try {
    await loadList();
  } catch (e) {
    return showError(`Cannot reach the server: ${e.message}`);
  }
  const id = location.hash.match(/^#\/c\/([\w.+-]+)$/)?.[1];
  if (id && state.conversations.some((c) => c.id === id)) await openConversation(id);
  else renderConversation();
  document.body.dataset.ready = "true";  // (for the tests)
}

start();
