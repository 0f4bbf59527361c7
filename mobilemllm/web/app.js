// mobilemllm web demo: upload an image, ask about it and follow up, streaming each answer from the bundle's runner.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { info: null, imageId: null, busy: false };

function showError(message) {
  const el = $("error");
  el.textContent = message;
  el.hidden = !message;
}

function fmt(v, digits) {
  return v === null || v === undefined || Number.isNaN(v) ? "–" : Number(v).toFixed(digits);
}

function mb(bytes) {  // the server's human_size: kB below 100 kB, else MB
  return bytes >= 1e5 ? (bytes / 1e6).toFixed(1) + " MB" : (bytes / 1e3).toFixed(0) + " kB";
}

async function loadInfo() {
  try {
    const res = await fetch("/api/info");
    const info = await res.json();
    state.info = info;
    const q = Object.entries(info.quantization || {}).map(([k, v]) => `${k} ${v}`).join(", ");
    $("model-info").textContent =
      `${info.model} · ${info.format}/${info.target} bundle “${info.bundle}” · ${info.image_size}px images → ` +
      `${info.visual_tokens} visual tokens · template ${info.template} · context ${info.max_context_len}` +
      (q ? ` · ${q}` : "");
    $("max-new-tokens").value = info.max_new_tokens;
  } catch (e) {
    showError("cannot reach the demo server: " + e);
  }
}

function clearLog() {
  $("log").replaceChildren();
  delete $("log").dataset.state;
  $("stats").textContent = "";
}

async function upload(file) {
  showError("");
  state.imageId = null;
  clearLog();
  $("preview").hidden = true;
  $("model-view").hidden = true;
  $("preview-caption").textContent = "";
  $("model-view-caption").textContent = "";
  const limit = state.info ? state.info.max_upload_bytes : Infinity;
  if (file.size > limit) {
    $("upload-status").textContent = "";
    showError(`the image is ${mb(file.size)}; this demo accepts up to ${mb(limit)} ` +
              "(start it with a larger --max-upload-mb, or shrink the image)");
    return;
  }
  $("upload-status").textContent = `uploading ${file.name}…`;
  let body;
  try {
    const res = await fetch("/api/image", { method: "POST", body: file,
                                            headers: { "Content-Type": file.type || "application/octet-stream" } });
    body = await res.json();
    if (!res.ok) throw new Error(body.error || res.statusText);
  } catch (e) {
    $("upload-status").textContent = "";
    showError(e.message || String(e));
    return;
  }
  state.imageId = body.id;
  $("upload-status").textContent = `${file.name}: ${body.width}×${body.height} uploaded`;
  $("preview").src = URL.createObjectURL(file);
  $("preview").hidden = false;
  $("preview-caption").textContent = "your image";
  $("model-view").src = body.model_view;
  $("model-view").hidden = false;
  $("model-view-caption").textContent = `what the model sees (${state.info ? state.info.image_size : "?"}px)`;
  $("question").focus();
}

function addTurn(question) {
  const turn = document.createElement("div");
  turn.className = "turn";
  turn.dataset.turn = String($("log").children.length + 1);
  const q = document.createElement("div");
  q.className = "q";
  q.textContent = question;
  const a = document.createElement("div");
  a.className = "a streaming";
  turn.append(q, a);
  $("log").append(turn);
  return a;
}

// Reads "data: {...}\n\n" events from a streamed fetch response.
async function* events(res) {
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const block = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      for (const line of block.split("\n")) {
        if (line.startsWith("data: ")) yield JSON.parse(line.slice(6));
      }
    }
  }
}

async function ask(question) {
  showError("");
  if (!state.imageId) { showError("upload an image first"); return; }
  if (!question.trim()) { showError("type a question about the image first"); return; }
  state.busy = true;
  $("ask").disabled = true;
  $("stats").textContent = "";
  const answer = addTurn(question);
  $("log").dataset.state = "streaming";
  try {
    const res = await fetch("/api/ask", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ image: state.imageId, question,
                             max_new_tokens: Number($("max-new-tokens").value),
                             temperature: Number($("temperature").value) }),
    });
    if (!res.ok) {
      const body = await res.json();
      throw new Error(body.error || res.statusText);
    }
    let finished = false;
    for await (const ev of events(res)) {
      if (ev.type === "text") {
        answer.textContent += ev.text;
      } else if (ev.type === "stats") {
        $("stats").textContent =
          `time to first token ${fmt(ev.ttft_ms, 0)} ms · decode ${fmt(ev.decode_tokens_per_s, 1)} tok/s · ` +
          `prefill ${fmt(ev.prefill_tokens_per_s, 1)} tok/s · ${ev.prompt_tokens} prompt` +
          (ev.reused_tokens ? ` (${ev.reused_tokens} from the cache)` : "") +
          ` + ${ev.generated_tokens} generated tokens`;
        $("stats").dataset.ttftMs = ev.ttft_ms;
        $("stats").dataset.decodeTokensPerS = ev.decode_tokens_per_s;
      } else if (ev.type === "error") {
        throw new Error(ev.message);
      } else if (ev.type === "done") {
        finished = true;
      }
    }
    if (!finished) throw new Error("the answer stream ended early (did the server stop?)");
    $("log").dataset.state = "done";
    $("question").value = "";
  } catch (e) {
    $("log").dataset.state = "error";
    showError(e.message || String(e));
  } finally {
    answer.classList.remove("streaming");
    state.busy = false;
    $("ask").disabled = false;
  }
}

$("file").addEventListener("change", (e) => { if (e.target.files[0]) upload(e.target.files[0]); });
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  if (e.dataTransfer.files[0]) upload(e.dataTransfer.files[0]);
});
async function newConversation() {
  showError("");
  if (!state.imageId || state.busy) return;
  try {
    const res = await fetch("/api/reset", { method: "POST", headers: { "Content-Type": "application/json" },
                                            body: JSON.stringify({ image: state.imageId }) });
    const body = await res.json();
    if (!res.ok) throw new Error(body.error || res.statusText);
    clearLog();
    $("question").focus();
  } catch (e) {
    showError(e.message || String(e));
  }
}

$("new-chat").addEventListener("click", newConversation);
$("ask-form").addEventListener("submit", (e) => {
  e.preventDefault();
  if (!state.busy) ask($("question").value);
});
loadInfo();
