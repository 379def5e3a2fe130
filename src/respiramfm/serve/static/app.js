// RespiraMFM demo page: upload or record audio, describe symptoms, pick a task, show the model's answer.
// No external resources and no innerHTML with server or user text (everything goes through textContent).
"use strict";

// Canonical symptom phrases used by the dataset adapters, so the text reads like the training contexts.
const SYMPTOMS = [
  "dry cough", "wet cough", "wheezing", "shortness of breath", "tightness in the chest", "chest pain",
  "fever", "chills", "sore throat", "runny or blocked nose", "headache", "fatigue", "muscle pain",
  "loss of smell and/or taste",
];
const MAX_RECORD_SECONDS = 60;

const $ = (id) => document.getElementById(id);
let recordedBlob = null;
let recorder = null;
let recordTimer = null;
let lastAutoText = "";
let limits = { max_upload_bytes: 20 * 1024 * 1024, max_seconds: 120 };

function symptomSentence() {
  const ticked = SYMPTOMS.filter((s, i) => $("sym-" + i).checked);
  if (!ticked.length) return "";
  return "Patient presents with the following respiratory symptoms: " + ticked.join(", ") + ".";
}

function buildSymptomBoxes() {
  const box = $("symptom-boxes");
  SYMPTOMS.forEach((s, i) => {
    const label = document.createElement("label");
    const input = document.createElement("input");
    input.type = "checkbox";
    input.id = "sym-" + i;
    input.value = s;
    input.addEventListener("change", () => {
      // Rewrite the generated sentence; keep anything typed after it.
      const area = $("symptoms");
      const next = symptomSentence();
      const rest = area.value.startsWith(lastAutoText) ? area.value.slice(lastAutoText.length).trim() : "";
      area.value = [next, rest].filter(Boolean).join(" ");
      lastAutoText = next;
    });
    label.append(input, " " + s);
    box.append(label);
  });
}

async function loadModelInfo() {
  try {
    const health = await (await fetch("/health")).json();
    limits = health.limits || limits;
    $("model-line").textContent = "Model " + health.model + " (" + health.backbone + ", " + health.mode +
      "). Uploads up to " + Math.round(limits.max_upload_bytes / 1048576) + " MB and " + limits.max_seconds + " s.";
    showTrainedOn(health.trained_on);
  } catch (e) {
    $("model-line").textContent = "Could not reach the server.";
  }
  const select = $("task");
  try {
    const { tasks } = await (await fetch("/tasks")).json();
    // Never preselect a task the model was not trained on: the first trained task, else a placeholder.
    const placeholder = document.createElement("option");
    placeholder.value = "";
    placeholder.textContent = "- choose a task -";
    placeholder.dataset.description = "";
    select.append(placeholder);
    let chosen = null;
    for (const t of tasks) {
      const opt = document.createElement("option");
      opt.value = t.name;
      const note = t.dataset_seen === false ? " (never seen in training)" :
        (t.role === "zero-shot" ? " (zero-shot)" : "");
      opt.textContent = t.name + " - " + t.disease + note + " - " + t.audio_type;
      opt.dataset.description = t.description || "";
      select.append(opt);
      if (chosen === null && t.trained === true) chosen = t.name;
    }
    select.value = chosen || "";
    const describe = () => {
      const o = select.selectedOptions[0];
      $("task-description").textContent = o ? o.dataset.description : "";
    };
    select.addEventListener("change", describe);
    describe();
  } catch (e) {
    showError("Could not load the task list: " + e);
  }
}

function showPlayback(audio) {
  const player = $("playback");
  if (player.src) URL.revokeObjectURL(player.src);
  if (audio) {
    player.src = URL.createObjectURL(audio);
    player.hidden = false;
  } else {
    player.removeAttribute("src");
    player.hidden = true;
  }
}

function setRecording(blob) {
  recordedBlob = blob;
  showPlayback(blob);
  $("clear-audio").hidden = !blob;
  if (blob) $("audio-file").value = "";
}

async function startRecording() {
  hideError();
  if (!navigator.mediaDevices || !window.MediaRecorder) {
    showError("This browser cannot record audio here (it needs MediaRecorder and a secure origin).");
    return;
  }
  let stream;
  try {
    stream = await navigator.mediaDevices.getUserMedia({ audio: true });
  } catch (e) {
    showError("Microphone not available: " + e.message);
    return;
  }
  const type = MediaRecorder.isTypeSupported("audio/webm;codecs=opus") ? "audio/webm;codecs=opus" : "";
  recorder = new MediaRecorder(stream, type ? { mimeType: type } : {});
  const chunks = [];
  const started = Date.now();
  recorder.ondataavailable = (ev) => { if (ev.data.size) chunks.push(ev.data); };
  recorder.onstop = () => {
    stream.getTracks().forEach((t) => t.stop());
    clearInterval(recordTimer);
    const blob = new Blob(chunks, { type: recorder.mimeType || "audio/webm" });
    setRecording(blob);
    $("record-status").textContent = "Recorded " + ((Date.now() - started) / 1000).toFixed(1) + " s.";
    $("record-btn").disabled = false;
    $("stop-btn").disabled = true;
  };
  recorder.start();
  $("record-btn").disabled = true;
  $("stop-btn").disabled = false;
  const maxS = Math.min(MAX_RECORD_SECONDS, limits.max_seconds);
  recordTimer = setInterval(() => {
    const s = (Date.now() - started) / 1000;
    $("record-status").textContent = "Recording... " + s.toFixed(0) + " s";
    if (s >= maxS) stopRecording();
  }, 250);
}

function stopRecording() {
  if (recorder && recorder.state !== "inactive") recorder.stop();
}

function showError(text) {
  const box = $("error");
  box.textContent = text;
  box.hidden = false;
}

function hideError() {
  $("error").hidden = true;
}

function errorText(status, body) {
  if (!body) return "Request failed (HTTP " + status + ").";
  let detail = body.detail;
  if (Array.isArray(detail)) detail = detail.map((d) => (d.loc || []).join(".") + ": " + d.msg).join("\n");
  return (body.error || "error") + " (HTTP " + status + "): " + detail;
}

function showTrainedOn(info) {
  const line = $("trained-on");
  if (!info || !info.recorded) {
    line.textContent = "This model does not record what data it was trained on.";
    return;
  }
  const parts = [];
  if (info.real_datasets.length) parts.push("real data: " + info.real_datasets.join(", "));
  if (info.simulated_datasets.length) parts.push("SIMULATED data: " + info.simulated_datasets.join(", "));
  line.textContent = "Trained on " + parts.join("; ") + ". Tasks trained: " + info.tasks_trained.join(", ") + "." +
    (info.simulated && !info.real_datasets.length ?
      " This model has never seen a real recording; its output says nothing about real patients." : "");
  if (info.simulated) line.className = "sim-warning";
}

function renderResult(r) {
  $("result-disease").textContent = r.disease + " (" + r.task + ")";
  $("probability").textContent = (100 * r.probability).toFixed(1) + "%";
  $("prob-bar").style.width = (100 * r.probability).toFixed(1) + "%";
  let meta = "Used: " + r.modalities_used.join(" + ") + ". Model: " + r.model + ".";
  if (r.audio) meta += " Audio: " + r.audio.format + ", " + r.audio.seconds.toFixed(1) + " s.";
  $("result-meta").textContent = meta;
  $("decision").textContent = r.decision === undefined || r.decision === null ?
    "Decision: " + (r.threshold_rule || "no threshold") + "." :
    "Decision at the threshold " + r.threshold.toFixed(3) + ": condition " +
      (r.decision === 1 ? "flagged" : "not flagged") + " (" + r.threshold_rule + ").";
  const ul = $("warnings");
  ul.replaceChildren();
  for (const w of r.warnings || []) {
    const li = document.createElement("li");
    li.textContent = w;
    ul.append(li);
  }
  if (r.spectrogram_png) {
    $("spectrogram").src = "data:image/png;base64," + r.spectrogram_png;
    $("spectrogram-block").hidden = false;
  } else {
    $("spectrogram-block").hidden = true;
  }
  const words = (r.attention && r.attention.words) || [];
  const holder = $("attention-words");
  holder.replaceChildren();
  if (words.length) {
    const top = Math.max(...words.map((w) => w.weight)) || 1;
    for (const w of words) {
      const span = document.createElement("span");
      span.textContent = w.text;
      span.title = "attention " + (100 * w.weight).toFixed(2) + "%";
      span.style.backgroundColor = "rgba(255, 150, 0, " + (0.85 * w.weight / top).toFixed(3) + ")";
      if (w.weight / top > 0.5) span.className = "hot";
      holder.append(span);
    }
    $("context-mass").textContent = "Share of attention on the context: " +
      (100 * r.attention.context_mass).toFixed(1) + "%.";
    $("attention-block").hidden = false;
  } else {
    $("attention-block").hidden = true;
  }
  $("result").hidden = false;
}

async function submit(ev) {
  ev.preventDefault();
  hideError();
  const form = new FormData();
  if (!$("task").value) {
    showError("Choose a task first.");
    return;
  }
  form.append("task", $("task").value);
  const file = $("audio-file").files[0];
  const audio = file || recordedBlob;
  if (audio) {
    if (audio.size > limits.max_upload_bytes) {
      showError("The recording is larger than the server accepts (" + limits.max_upload_bytes + " bytes).");
      return;
    }
    form.append("audio", audio, file ? file.name : "recording.webm");
  }
  const metadata = $("metadata").value.trim();
  const symptoms = $("symptoms").value.trim();
  if (metadata) form.append("metadata", metadata);
  else if (symptoms) form.append("symptoms", symptoms);
  if (!audio && !metadata && !symptoms) {
    showError("Add a recording and/or symptoms first.");
    return;
  }
  form.append("attribution", "true");
  form.append("spectrogram", "true");
  $("submit-btn").disabled = true;
  $("busy").hidden = false;
  try {
    const resp = await fetch("/predict", { method: "POST", body: form });
    let body = null;
    try { body = await resp.json(); } catch (e) { body = null; }
    if (!resp.ok) {
      showError(errorText(resp.status, body));
      return;
    }
    renderResult(body);
  } catch (e) {
    showError("Request failed: " + e.message);
  } finally {
    $("submit-btn").disabled = false;
    $("busy").hidden = true;
  }
}

document.addEventListener("DOMContentLoaded", () => {
  buildSymptomBoxes();
  loadModelInfo();
  $("record-btn").addEventListener("click", startRecording);
  $("stop-btn").addEventListener("click", stopRecording);
  $("clear-audio").addEventListener("click", () => setRecording(null));
  $("audio-file").addEventListener("change", () => {
    const file = $("audio-file").files[0];
    if (file) setRecording(null);
    showPlayback(file || null);
  });
  $("predict-form").addEventListener("submit", submit);
});
