// patchcore web page: plain JS, no build step. Talks to the JSON API of the same service.
"use strict";

(function () {
  const HISTORY_SIZE = 12;
  const $ = (id) => document.getElementById(id);
  const modelSelect = $("model");
  const fileInput = $("file");
  const drop = $("drop");
  const statusLine = $("status");
  let originalUrl = null;
  let busy = false;
  let counter = 0;
  let lastFile = null;
  // The teach-in token lives in this tab only (sessionStorage), never in the page's address or cookies.
  const TOKEN_KEY = "patchcore-teach-token";

  function setStatus(text, isError) {
    statusLine.textContent = text;
    statusLine.className = isError ? "error" : "";
  }

  function formatScore(value) {
    return typeof value === "number" ? value.toFixed(4) : "–";
  }

  async function loadModels() {
    try {
      const response = await fetch("/v1/models");
      const body = await response.json();
      if (!response.ok) throw new Error(body.error || response.statusText);
      const selected = modelSelect.value;
      modelSelect.replaceChildren();
      for (const model of body.models) {
        const option = document.createElement("option");
        option.value = model.name;
        option.textContent = model.name;
        option.dataset.evidence = model.evidence ? "3" : "0";
        option.dataset.info = `version ${model.version}, ${model.backbone}, memory bank ${model.memory_bank_size}` +
          (model.threshold == null ? ", no threshold" : `, threshold ${formatScore(model.threshold)}`);
        modelSelect.appendChild(option);
      }
      if (selected && body.models.some((model) => model.name === selected)) modelSelect.value = selected;
      showModelInfo();
      document.body.dataset.ready = "true";
    } catch (err) {
      setStatus(`Could not list the models: ${err.message}`, true);
    }
  }

  function showModelInfo() {
    const option = modelSelect.selectedOptions[0];
    $("model-info").textContent = option ? option.dataset.info : "";
  }

  async function score(file) {
    if (busy) { setStatus("Still scoring the previous image…", false); return; }
    const model = modelSelect.value;
    if (!model) { setStatus("No model to score with.", true); return; }
    busy = true;
    setStatus(`Scoring ${file.name} with ${model}…`, false);
    const form = new FormData();
    form.append("file", file, file.name);
    try {
      const withEvidence = modelSelect.selectedOptions[0]?.dataset.evidence || "0";
      const url = `/v1/models/${encodeURIComponent(model)}/predict?overlay=true&mask=false&evidence=${withEvidence}`;
      const response = await fetch(url, { method: "POST", body: form });
      let body;
      try { body = await response.json(); } catch (e) { body = { error: response.statusText }; }
      if (!response.ok) throw new Error(body.error || `HTTP ${response.status}`);
      lastFile = file;
      showResult(file, body);
      addHistory(file.name, body, null);
      setStatus("", false);
    } catch (err) {
      setStatus(`${file.name}: ${err.message}`, true);
      addHistory(file.name, null, err.message);
    } finally {
      busy = false;
      fileInput.value = "";
    }
  }

  function verdictOf(result) {
    if (result.is_anomalous === true) return ["anomalous", "Anomalous"];
    if (result.is_anomalous === false) return ["normal", "Normal"];
    return ["unknown", "No threshold"];
  }

  function showResult(file, result) {
    $("result").hidden = false;
    $("score").textContent = formatScore(result.score);
    const [cls, text] = verdictOf(result);
    const verdict = $("verdict");
    verdict.textContent = text;
    verdict.className = `verdict ${cls}`;
    $("threshold").textContent = result.threshold == null ? "none" : formatScore(result.threshold);
    $("timing").textContent = `${Math.round(result.timing_ms.total)} ms`;
    if (originalUrl) URL.revokeObjectURL(originalUrl);
    originalUrl = URL.createObjectURL(file);
    $("original").src = originalUrl;
    $("overlay").src = `data:image/png;base64,${result.overlay_png}`;
    const scale = result.map_scale;
    $("overlay-caption").textContent = scale
      ? `Heat map, ${scale.fixed ? "fixed" : "this image's"} scale ${formatScore(scale.low)} (blue) – ${formatScore(scale.high)} (red)`
      : "Heat map";
    showEvidence(result.evidence || []);
  }

  function showEvidence(items) {
    const list = $("evidence");
    list.replaceChildren();
    $("evidence-section").hidden = items.length === 0;
    for (const item of items) {
      const figure = document.createElement("figure");
      const img = document.createElement("img");
      img.src = `data:image/png;base64,${item.picture_png}`;
      img.alt = "anomalous patch beside its nearest normal patch";
      const caption = document.createElement("figcaption");
      const source = item.training_image.split("/").pop();
      caption.textContent = `distance ${formatScore(item.distance)} – nearest normal: ${source}, ` +
        `row ${item.training_row}, column ${item.training_column}`;
      figure.append(img, caption);
      list.append(figure);
    }
  }

  function addHistory(name, result, error) {
    counter += 1;
    const item = document.createElement("li");
    const meta = document.createElement("div");
    meta.className = "meta";
    const title = document.createElement("div");
    title.className = "name";
    title.textContent = name;
    title.title = name;
    meta.appendChild(title);
    const line = document.createElement("div");
    if (result) {
      const thumb = document.createElement("img");
      thumb.alt = `heat map of ${name}`;
      thumb.src = `data:image/png;base64,${result.overlay_png}`;
      item.appendChild(thumb);
      const [cls, text] = verdictOf(result);
      const verdict = document.createElement("span");
      verdict.className = `verdict ${cls}`;
      verdict.textContent = text;
      line.textContent = `${result.model}: ${formatScore(result.score)} `;
      line.appendChild(verdict);
    } else {
      item.className = "error";
      line.textContent = `error: ${error}`;
    }
    meta.appendChild(line);
    item.appendChild(meta);
    item.dataset.index = String(counter);
    const list = $("history");
    list.prepend(item);
    while (list.children.length > HISTORY_SIZE) list.lastElementChild.remove();
  }

  // -- teach-in: offered only once a token is given ------------------------------------------
  function teachStatus(text, isError) {
    const line = $("teach-status");
    line.textContent = text;
    line.className = isError ? "error" : "";
  }

  function showTeachIn() {
    const token = sessionStorage.getItem(TOKEN_KEY);
    $("token-form").hidden = Boolean(token);
    $("teach-actions").hidden = !token;
  }

  async function changeModel(path, body, doneText) {
    const token = sessionStorage.getItem(TOKEN_KEY);
    const model = modelSelect.value;
    if (!token || !model) return;
    teachStatus("Working…", false);
    try {
      const response = await fetch(`/v1/models/${encodeURIComponent(model)}/${path}`, {
        method: "POST", body, headers: { Authorization: `Bearer ${token}` },
      });
      let answer;
      try { answer = await response.json(); } catch (e) { answer = { error: response.statusText }; }
      if (response.status === 401) {
        sessionStorage.removeItem(TOKEN_KEY);
        showTeachIn();
      }
      if (!response.ok) throw new Error(answer.error || `HTTP ${response.status}`);
      teachStatus(doneText(answer), false);
      await loadModels();
    } catch (err) {
      teachStatus(err.message, true);
    }
  }

  $("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const token = $("teach-token").value.trim();
    if (!token) return;
    sessionStorage.setItem(TOKEN_KEY, token);
    $("teach-token").value = "";
    showTeachIn();
  });
  $("forget-token").addEventListener("click", () => { sessionStorage.removeItem(TOKEN_KEY); showTeachIn(); });
  $("teach").addEventListener("click", () => {
    if (!lastFile) { teachStatus("Score an image first: the last image scored is the one taught.", true); return; }
    const form = new FormData();
    form.append("file", lastFile, lastFile.name);
    changeModel("good", form, (a) => `Taught ${lastFile.name}: version ${a.version}, memory bank ${a.bank_size}` +
      ` (+${a.added_to_bank}).`);
  });
  $("undo").addEventListener("click", () => {
    changeModel("rollback", null, (a) => `Version ${a.restored_version} restored as version ${a.version}.`);
  });
  showTeachIn();

  $("original").addEventListener("error", () => {
    $("original").alt = "this browser cannot show the original (e.g. TIFF or 16-bit); see the heat map";
  });
  modelSelect.addEventListener("change", showModelInfo);
  fileInput.addEventListener("change", () => { if (fileInput.files.length) score(fileInput.files[0]); });
  for (const name of ["dragenter", "dragover"]) {
    drop.addEventListener(name, (event) => { event.preventDefault(); drop.classList.add("over"); });
  }
  for (const name of ["dragleave", "drop"]) {
    drop.addEventListener(name, (event) => { event.preventDefault(); drop.classList.remove("over"); });
  }
  drop.addEventListener("drop", (event) => {
    const files = event.dataTransfer && event.dataTransfer.files;
    if (files && files.length) score(files[0]);
  });
  loadModels();
})();
