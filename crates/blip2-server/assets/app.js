// The BLIP-2 demo page: choose a photo, caption it, and chat about it. It talks only to
// this server's /api endpoints; generated text arrives as server-sent events.
"use strict";

const $ = (id) => document.getElementById(id);

const state = {
  photo: null, // the chosen photo (a Blob)
  photoName: "",
  previewUrl: null,
  session: null, // the server's conversation id, so follow-ups reuse the encoded photo
  busy: false,
  captioning: true, // false when the server runs a retrieval checkpoint
  limits: null,
};

// An error the server reported as {"error": {"code", "message", ...}}.
class ApiError extends Error {
  constructor(error, status) {
    super(error.message);
    this.code = error.code;
    this.status = status;
  }
}

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = false;
}

function clearError() {
  const box = $("error");
  box.textContent = "";
  box.hidden = true;
}

function describe(error) {
  if (error instanceof ApiError) return error.message;
  if (error instanceof TypeError) return `Cannot reach the server (${error.message}). Is it still running?`;
  return error.message || String(error);
}

function formatBytes(bytes) {
  if (bytes < 1024 * 1024) return `${(bytes / 1024).toFixed(0)} KB`;
  return `${(bytes / (1024 * 1024)).toFixed(1)} MB`;
}

function updateButtons() {
  const ready = state.photo !== null && state.captioning;
  $("caption-button").disabled = !ready || state.busy;
  $("question").disabled = !ready;
  $("ask-button").disabled = !ready || state.busy;
  $("new-chat").disabled = state.busy || $("messages").children.length === 0;
}

function setBusy(busy) {
  state.busy = busy;
  updateButtons();
}

// Settings

function showValue(input) {
  const output = document.querySelector(`output[for="${input.id}"]`);
  if (output) output.textContent = input.value;
}

function setRange(id, value, max) {
  const input = $(id);
  if (max !== undefined) input.max = String(max);
  if (value !== undefined && value !== null) input.value = String(value);
  showValue(input);
}

function decodingMode() {
  return document.querySelector('input[name="decoding"]:checked').value;
}

function showModeSettings() {
  const mode = decodingMode();
  for (const setting of document.querySelectorAll(".setting[data-mode]")) {
    setting.hidden = setting.dataset.mode !== mode;
  }
}

function applyDefaults(defaults, limits) {
  setRange("num_beams", defaults.num_beams, limits.max_num_beams);
  setRange("length_penalty", defaults.length_penalty);
  setRange("temperature", defaults.temperature);
  setRange("top_p", defaults.top_p);
  setRange("repetition_penalty", defaults.repetition_penalty);
  setRange("min_new_tokens", defaults.min_new_tokens, limits.max_new_tokens_limit);
  setRange("max_new_tokens", defaults.max_new_tokens, limits.max_new_tokens_limit);
  const radio = document.querySelector(`input[name="decoding"][value="${defaults.decoding}"]`);
  if (radio) radio.checked = true;
  showModeSettings();
}

// Only the settings of the chosen method are sent; the server rejects the others.
function appendSettings(form) {
  const mode = decodingMode();
  form.append("decoding", mode);
  if (mode === "beam") {
    form.append("num_beams", $("num_beams").value);
    form.append("length_penalty", $("length_penalty").value);
  } else {
    form.append("temperature", $("temperature").value);
    form.append("top_p", $("top_p").value);
  }
  form.append("repetition_penalty", $("repetition_penalty").value);
  form.append("min_new_tokens", $("min_new_tokens").value);
  form.append("max_new_tokens", $("max_new_tokens").value);
}

// Server-sent events over fetch (EventSource cannot POST a form).

function parseEvent(block) {
  let name = "message";
  const data = [];
  for (const line of block.split("\n")) {
    if (line === "" || line.startsWith(":")) continue;
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "event") name = value;
    else if (field === "data") data.push(value);
  }
  return data.length === 0 ? null : { name, data: data.join("\n") };
}

// Posts `form` and passes each generated piece of text to `onText`. Resolves to the final
// JSON result, and rejects with an ApiError for an error response or an error event.
async function streamRequest(url, form, onText) {
  const response = await fetch(url, {
    method: "POST",
    body: form,
    headers: { Accept: "text/event-stream" },
  });
  const type = response.headers.get("content-type") || "";
  if (!type.startsWith("text/event-stream")) {
    if (type.includes("application/json")) {
      const body = await response.json();
      if (body.error) throw new ApiError(body.error, response.status);
      return body;
    }
    throw new Error(`The server responded ${response.status} ${response.statusText}.`);
  }
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value.replace(/\r/g, "");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = parseEvent(buffer.slice(0, end));
      buffer = buffer.slice(end + 2);
      if (event === null) continue;
      const data = JSON.parse(event.data);
      if (event.name === "text") onText(data.text);
      else if (event.name === "done") return data;
      else if (event.name === "error") throw new ApiError(data.error, response.status);
    }
  }
  throw new Error("The connection closed before the answer was complete.");
}

// Puts a final text in place of the streamed pieces; an empty text gets a note instead.
function showText(element, text, emptyNote) {
  element.classList.toggle("note", text === "");
  element.textContent = text === "" ? emptyNote : text;
}

// The photo

function choosePhoto(blob, name) {
  clearError();
  if (blob.type && !blob.type.startsWith("image/")) {
    showError(`${name} is not an image (its type is ${blob.type}). Choose a JPEG, PNG, WebP, GIF, BMP or TIFF photo.`);
    return;
  }
  const limit = state.limits ? state.limits.max_upload_bytes : Infinity;
  if (blob.size > limit) {
    showError(
      `${name} is ${formatBytes(blob.size)}, larger than this server accepts ` +
        `(${formatBytes(limit)}, its max_upload_bytes limit of ${limit} bytes). Choose a smaller photo.`,
    );
    return;
  }
  state.photo = blob;
  state.photoName = name;
  state.session = null;
  if (state.previewUrl) URL.revokeObjectURL(state.previewUrl);
  state.previewUrl = URL.createObjectURL(blob);
  const preview = $("preview");
  preview.src = state.previewUrl;
  preview.hidden = false;
  const caption = $("caption");
  caption.textContent = "";
  caption.dataset.state = "empty";
  $("messages").replaceChildren();
  updateButtons();
}

async function chooseExample(name) {
  try {
    const response = await fetch(`/examples/${encodeURIComponent(name)}`);
    if (!response.ok) throw new Error(`The example photo ${name} could not be loaded (${response.status}).`);
    choosePhoto(await response.blob(), name);
  } catch (error) {
    showError(describe(error));
  }
}

function firstImage(files) {
  return Array.from(files || []).find((file) => file.type.startsWith("image/")) || (files && files[0]);
}

// Captions and chat

async function caption() {
  if (!state.photo || state.busy) return;
  clearError();
  setBusy(true);
  const output = $("caption");
  output.classList.remove("note");
  output.textContent = "";
  output.dataset.state = "streaming";
  const form = new FormData();
  form.append("image", state.photo, state.photoName);
  appendSettings(form);
  // The caption's encoded photo becomes the chat's, unless a chat is already going on.
  const startSession = state.session === null;
  if (startSession) form.append("start_session", "true");
  try {
    const result = await streamRequest("/api/caption", form, (piece) => {
      output.textContent += piece;
    });
    showText(output, result.caption, "(the model wrote an empty caption)");
    output.dataset.state = "done";
    if (startSession && result.session) state.session = result.session;
  } catch (error) {
    output.textContent = "";
    output.dataset.state = "error";
    showError(describe(error));
  } finally {
    setBusy(false);
  }
}

function addMessage(role, text) {
  const item = document.createElement("li");
  item.className = role;
  item.textContent = text;
  $("messages").append(item);
  item.scrollIntoView({ block: "nearest" });
  return item;
}

function askForm(question) {
  const form = new FormData();
  form.append("question", question);
  if (state.session) form.append("session", state.session);
  else form.append("image", state.photo, state.photoName);
  appendSettings(form);
  return form;
}

async function ask(event) {
  event.preventDefault();
  const input = $("question");
  const question = input.value.trim();
  if (question === "" || !state.photo || state.busy) return;
  clearError();
  setBusy(true);
  input.value = "";
  addMessage("user", question);
  const reply = addMessage("bot", "");
  reply.dataset.state = "streaming";
  const onText = (piece) => {
    reply.textContent += piece;
  };
  try {
    let result;
    try {
      result = await streamRequest("/api/ask", askForm(question), onText);
    } catch (error) {
      if (!(error instanceof ApiError) || error.code !== "session_not_found") throw error;
      // The server evicted the conversation: start again from the photo.
      state.session = null;
      reply.textContent = "";
      const note = document.createElement("li");
      note.className = "note";
      note.textContent = "The server had forgotten this conversation, so it starts again from the photo.";
      reply.before(note);
      result = await streamRequest("/api/ask", askForm(question), onText);
    }
    showText(reply, result.answer, "(the model gave an empty answer)");
    reply.dataset.state = "done";
    state.session = result.session;
  } catch (error) {
    reply.textContent = describe(error);
    reply.dataset.state = "error";
    showError(describe(error));
  } finally {
    setBusy(false);
    input.focus();
  }
}

function newChat() {
  state.session = null;
  $("messages").replaceChildren();
  clearError();
  updateButtons();
}

async function loadHealth() {
  try {
    const response = await fetch("/api/health");
    const health = await response.json();
    state.limits = health.limits;
    const model = health.model;
    const kind = model.kind === "captioning" ? `captioning with ${model.language_model}` : "image-text retrieval";
    $("model-info").textContent = `Model: ${model.name} (${kind}, ${model.dtype})`;
    $("question").maxLength = health.limits.max_text_chars;
    applyDefaults(health.defaults, health.limits);
    if (model.kind !== "captioning") {
      state.captioning = false;
      showError(
        "This server runs an image-text retrieval checkpoint, which cannot write captions or answer " +
          "questions. Start it with a captioning checkpoint (blip2 serve --model DIR) to use this page; " +
          "/api/embed and /api/match work with this one.",
      );
    }
  } catch (error) {
    $("model-info").textContent = `Cannot reach the server: ${describe(error)}`;
  }
  updateButtons();
}

function setUp() {
  const dropZone = $("drop-zone");
  const fileInput = $("file-input");

  fileInput.addEventListener("change", () => {
    const file = fileInput.files[0];
    if (file) choosePhoto(file, file.name);
    fileInput.value = "";
  });
  dropZone.addEventListener("click", (event) => {
    if (event.target.tagName !== "LABEL") fileInput.click();
  });
  dropZone.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") {
      event.preventDefault();
      fileInput.click();
    }
  });
  for (const name of ["dragenter", "dragover"]) {
    dropZone.addEventListener(name, (event) => {
      event.preventDefault();
      dropZone.classList.add("dragging");
    });
  }
  dropZone.addEventListener("dragleave", () => dropZone.classList.remove("dragging"));
  dropZone.addEventListener("drop", (event) => {
    event.preventDefault();
    dropZone.classList.remove("dragging");
    const file = firstImage(event.dataTransfer.files);
    if (file) choosePhoto(file, file.name || "the dropped photo");
  });
  // A photo dropped next to the zone should not replace the page.
  document.addEventListener("dragover", (event) => event.preventDefault());
  document.addEventListener("drop", (event) => event.preventDefault());
  document.addEventListener("paste", (event) => {
    const files = event.clipboardData ? event.clipboardData.files : null;
    const file = Array.from(files || []).find((candidate) => candidate.type.startsWith("image/"));
    if (!file) return; // pasted text goes where the user typed it
    event.preventDefault();
    choosePhoto(file, file.name || "the pasted photo");
  });

  for (const button of document.querySelectorAll(".example")) {
    button.addEventListener("click", () => chooseExample(button.dataset.example));
  }
  $("caption-button").addEventListener("click", caption);
  $("ask-form").addEventListener("submit", ask);
  $("new-chat").addEventListener("click", newChat);

  for (const input of document.querySelectorAll('#settings input[type="range"]')) {
    input.addEventListener("input", () => showValue(input));
  }
  // Keep the minimum length at or below the maximum.
  $("min_new_tokens").addEventListener("input", () => {
    if (Number($("min_new_tokens").value) > Number($("max_new_tokens").value)) {
      setRange("max_new_tokens", $("min_new_tokens").value);
    }
  });
  $("max_new_tokens").addEventListener("input", () => {
    if (Number($("max_new_tokens").value) < Number($("min_new_tokens").value)) {
      setRange("min_new_tokens", $("max_new_tokens").value);
    }
  });
  for (const radio of document.querySelectorAll('input[name="decoding"]')) {
    radio.addEventListener("change", showModeSettings);
  }

  showModeSettings();
  for (const input of document.querySelectorAll('#settings input[type="range"]')) showValue(input);
  loadHealth();
}

setUp();
