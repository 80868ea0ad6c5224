// The chat page of `jaxsink serve`. Each conversation is one jaxsink session: every turn sends
// only its new message with `session`, so the server feeds only that and the stream never
// resets, however long the conversation grows. Model and user text enter the page as text nodes
// only (textContent, append), never as HTML.
"use strict";

const KEY_STORAGE = "jaxsink.apiKey";
const $ = (id) => document.getElementById(id);

const state = {
  session: newSessionName(),
  turns: 0, // requests the server accepted in this session (the system prompt goes with the first)
  controller: null, // the running reply's AbortController
};

class ServerError extends Error {}

function newSessionName() {
  const bytes = crypto.getRandomValues(new Uint8Array(8));
  return "web-" + Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

function requestHeaders() {
  const headers = { "Content-Type": "application/json" };
  const key = localStorage.getItem(KEY_STORAGE);
  if (key) headers.Authorization = "Bearer " + key;
  return headers;
}

// --- the transcript ---------------------------------------------------------------------------

/** A message bubble showing `text` as text; returns it. */
function addMessage(role, text) {
  const bubble = document.createElement("div");
  bubble.className = "msg " + role;
  const body = document.createElement("span");
  body.className = "text";
  body.textContent = text;
  bubble.append(body);
  $("messages").append(bubble);
  scrollDown();
  return bubble;
}

/** Append a streamed piece of text to a bubble (a text node: never parsed as HTML). */
function appendText(bubble, text) {
  bubble.querySelector(".text").append(text);
  scrollDown();
}

function addNote(bubble, text) {
  const note = document.createElement("span");
  note.className = "note";
  note.textContent = text;
  bubble.append(note);
}

function scrollDown() {
  const box = $("messages");
  box.scrollTop = box.scrollHeight;
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = false;
}

function clearError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

// --- talking to the server ------------------------------------------------------------------

/** The message of an error response: its OpenAI-style `error.message`, or its status. */
async function errorOf(response) {
  let message = `${response.status} ${response.statusText}`;
  try {
    const body = await response.json();
    if (body.error && body.error.message) message = `${response.status}: ${body.error.message}`;
  } catch (e) {
    // not JSON: the status says it
  }
  return message;
}

/** The `data:` payloads of a server-sent event stream, as they arrive. After each read the
 * page yields to its event loop: a read of data already queued resolves as a microtask, so a
 * fast reply would otherwise keep clicks (Stop) and rendering waiting until it ends. */
async function* serverEvents(stream) {
  const reader = stream.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  try {
    while (true) {
      const { value, done } = await reader.read();
      if (done) return;
      await new Promise((resolve) => setTimeout(resolve, 0));
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const data = block
          .split("\n")
          .filter((line) => line.startsWith("data:"))
          .map((line) => line.slice(5).trimStart())
          .join("\n");
        if (data) yield data;
      }
    }
  } finally {
    reader.cancel().catch(() => {});
  }
}

function numberOf(input) {
  const value = input.value.trim();
  return value === "" ? null : Number(value);
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
  $("system").disabled = busy || state.turns > 0;
}

async function send() {
  const text = $("message").value;
  if (!text.trim() || state.controller) return;
  clearError();
  const messages = [];
  const system = $("system").value.trim();
  if (state.turns === 0 && system) messages.push({ role: "system", content: system });
  messages.push({ role: "user", content: text });
  const body = {
    messages,
    session: state.session,
    stream: true,
    stream_options: { include_usage: true },
    temperature: numberOf($("temperature")),
    max_tokens: numberOf($("max-tokens")),
  };
  $("message").value = "";
  const question = addMessage("user", text);
  const bubble = addMessage("assistant", "");
  bubble.classList.add("streaming");
  const controller = new AbortController();
  state.controller = controller;
  setBusy(true);
  const started = performance.now();
  let first = null;
  let usage = null;
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: requestHeaders(),
      body: JSON.stringify(body),
      signal: controller.signal,
    });
    if (response.status === 401) {
      localStorage.removeItem(KEY_STORAGE);
      question.remove();
      bubble.remove();
      $("message").value = text;
      askForKey();
      throw new ServerError((await errorOf(response)) + ": enter the key, then send again");
    }
    if (!response.ok) throw new ServerError(await errorOf(response));
    state.turns += 1;
    let finished = false;
    for await (const data of serverEvents(response.body)) {
      if (data === "[DONE]") {
        finished = true;
        break;
      }
      const chunk = JSON.parse(data);
      if (chunk.error) throw new ServerError("the server failed: " + chunk.error.message);
      if (chunk.usage) usage = chunk.usage;
      const delta = chunk.choices && chunk.choices.length ? chunk.choices[0].delta : null;
      if (delta && delta.content) {
        if (first === null) {
          first = performance.now();
          $("ttft").textContent = ((first - started) / 1000).toFixed(2) + " s";
        }
        appendText(bubble, delta.content);
      }
    }
    if (!finished) throw new ServerError("the connection was lost before the reply ended");
    showSpeed(usage, first, performance.now());
  } catch (e) {
    if (e.name === "AbortError") {
      addNote(bubble, "stopped");
    } else {
      if (bubble.isConnected) addNote(bubble, "no reply: see the error below");
      showError(e instanceof ServerError ? e.message : "connection lost: " + e.message);
    }
  } finally {
    bubble.classList.remove("streaming");
    if (state.controller === controller) state.controller = null;
    setBusy(false);
    if (state.turns > 0) refreshSession(state.session, 20);
  }
}

/** The last reply's speed: its tokens after the first over the seconds since the first. */
function showSpeed(usage, first, ended) {
  const tokens = usage ? usage.completion_tokens : null;
  if (tokens > 1 && first !== null && ended > first) {
    const rate = (tokens - 1) / ((ended - first) / 1000);
    $("tok-per-s").textContent = `${tokens} tokens, ${rate.toFixed(1)} tok/s`;
  } else {
    $("tok-per-s").textContent = tokens === null ? "–" : `${tokens} tokens`;
  }
}

/** Tokens seen and cache slots in use, from the server's session info (again shortly while
 * the session is still answering, as it is just after a stop). */
async function refreshSession(name, tries) {
  try {
    const response = await fetch("/v1/sessions/" + encodeURIComponent(name), {
      headers: requestHeaders(),
    });
    if (!response.ok || name !== state.session) return;
    const info = await response.json();
    $("tokens-seen").textContent = info.tokens.toLocaleString("en");
    $("cache-slots").textContent =
      `${info.cache_slots.toLocaleString("en")} of ${info.cache_size.toLocaleString("en")}`;
    if (info.where === "busy" && tries > 1) setTimeout(() => refreshSession(name, tries - 1), 250);
  } catch (e) {
    // the numbers stay as they were; a failed send shows its own error
  }
}

function newConversation() {
  if (state.controller) state.controller.abort();
  state.session = newSessionName();
  state.turns = 0;
  $("messages").replaceChildren();
  $("session").textContent = state.session;
  $("tokens-seen").textContent = "0";
  $("cache-slots").textContent = "0";
  $("tok-per-s").textContent = "–";
  $("ttft").textContent = "–";
  clearError();
  setBusy(false);
  $("message").focus();
}

// --- the API key ------------------------------------------------------------------------------

function askForKey() {
  $("key-form").hidden = false;
  $("api-key").focus();
}

function saveKey(event) {
  event.preventDefault();
  const key = $("api-key").value.trim();
  if (!key) return;
  localStorage.setItem(KEY_STORAGE, key);
  $("api-key").value = "";
  $("key-form").hidden = true;
  clearError();
  loadModel();
}

/** The served model's name, which also tells whether this server wants a key we lack. */
async function loadModel() {
  try {
    const response = await fetch("/v1/models", { headers: requestHeaders() });
    if (response.status === 401) {
      localStorage.removeItem(KEY_STORAGE);
      askForKey();
      showError("This server needs an API key: enter it on the left.");
      return;
    }
    if (!response.ok) throw new ServerError(await errorOf(response));
    const models = await response.json();
    $("model").textContent = models.data.map((m) => m.id).join(", ");
  } catch (e) {
    showError(e instanceof ServerError ? e.message : "cannot reach the server: " + e.message);
  }
}

// --- wiring -----------------------------------------------------------------------------------

$("message").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    send();
  }
});
$("send").addEventListener("click", send);
$("stop").addEventListener("click", () => state.controller && state.controller.abort());
$("new-conversation").addEventListener("click", newConversation);
$("key-form").addEventListener("submit", saveKey);
$("session").textContent = state.session;
setBusy(false);
loadModel();
