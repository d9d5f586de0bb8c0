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
          (model.threshold == null ? ", no threshold" :
            `, threshold ${formatScore(model.threshold)} (${model.threshold_kind})`);
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
    $("threshold").textContent = result.threshold == null ? "none" :
      `${formatScore(result.threshold)} (${result.threshold_kind})`;
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
    $("queue-token-form").hidden = Boolean(token);
    $("queue-actions").hidden = !token;
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

  // -- the History view: the station's verdicts, reviews, the teach-in queue, drift -----------
  const PAGE_SIZE = 20;
  const NAME_KEY = "patchcore-reviewer";
  const REVIEW_TEXT = { false_alarm: "False alarm", confirmed_defect: "Confirmed defect" };
  const VERDICT_TEXT = { ok: ["normal", "OK"], ng: ["anomalous", "Flagged"], unrated: ["unknown", "No threshold"],
    error: ["unknown", "Unreadable"] };
  let historyOffset = 0;
  let historyTotal = 0;

  function element(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function lineStatus(id, text, isError) {
    const line = $(id);
    line.textContent = text;
    line.className = isError ? "error" : "";
  }

  async function getJson(url, options) {
    const response = await fetch(url, options);
    let body;
    try { body = await response.json(); } catch (e) { body = { error: response.statusText }; }
    if (!response.ok) {
      const error = new Error(body.error || `HTTP ${response.status}`);
      error.status = response.status;
      throw error;
    }
    return body;
  }

  function showView(name) {
    const history = name === "history";
    $("inspect-view").hidden = history;
    $("history-view").hidden = !history;
    $("show-inspect").setAttribute("aria-pressed", String(!history));
    $("show-history").setAttribute("aria-pressed", String(history));
    if (history) refreshHistory();
  }

  async function offerHistory() {
    try {
      const summary = await getJson("/v1/history");
      if (!summary.enabled) return; // no history database: nothing to show
      const select = $("h-model");
      for (const name of summary.models) {
        const option = element("option", "", name);
        option.value = name;
        select.appendChild(option);
      }
      $("show-history").hidden = false;
    } catch (err) {
      $("show-history").hidden = true; // no history database: nothing to show
    }
  }

  function historyQuery() {
    const query = new URLSearchParams({ limit: String(PAGE_SIZE), offset: String(historyOffset) });
    const add = (key, value) => { if (value !== "" && value != null) query.set(key, value); };
    add("model", $("h-model").value);
    add("verdict", $("h-verdict").value);
    add("min_score", $("h-min").value);
    add("max_score", $("h-max").value);
    add("reviewed", $("h-reviewed").value);
    for (const [key, id] of [["since", "h-since"], ["until", "h-until"]]) {
      const value = $(id).value; // local time, as the operator reads the clock
      if (value) add(key, new Date(value).toISOString());
    }
    return query;
  }

  async function refreshHistory(done) {
    try {
      const body = await getJson(`/v1/history/inspections?${historyQuery()}`);
      historyTotal = body.total;
      const list = $("inspections");
      list.replaceChildren(...body.inspections.map(inspectionItem));
      const last = Math.min(historyOffset + body.inspections.length, historyTotal);
      $("h-page").textContent = historyTotal ? `${historyOffset + 1}–${last} of ${historyTotal}` : "none";
      $("h-newer").disabled = historyOffset === 0;
      $("h-older").disabled = last >= historyTotal;
      lineStatus("h-status", done || (historyTotal ? "" : "No inspection matches these filters."), false);
    } catch (err) {
      lineStatus("h-status", `Could not list the inspections: ${err.message}`, true);
    }
    refreshQueue();
    refreshDrift();
  }

  function figure(url, alt, caption) {
    const node = element("figure");
    const img = element("img");
    img.src = url;
    img.alt = alt;
    img.loading = "lazy";
    node.append(img, element("figcaption", "", caption));
    return node;
  }

  function inspectionItem(row) {
    const item = element("li", "inspection");
    item.dataset.id = String(row.id);
    item.dataset.photo = row.photo;
    const head = element("div", "head");
    const [cls, text] = VERDICT_TEXT[row.verdict] || ["unknown", row.verdict];
    head.append(element("span", "name", row.photo), element("span", `verdict ${cls}`, text),
      element("span", "", `score ${formatScore(row.score)}` + (row.threshold == null ? "" : ` (threshold ${formatScore(row.threshold)})`)),
      element("span", "muted", `${row.model} v${row.model_version} · ${new Date(row.at).toLocaleString()} · ${row.station}`));
    if (row.review) {
      head.append(element("span", `verdict review reviewed-${row.review}`, REVIEW_TEXT[row.review]));
    }
    item.append(head);
    if (row.error) item.append(element("p", "error", row.error));
    const pictures = element("div", "pictures");
    if (row.files.overlay) pictures.append(figure(row.files.overlay, `heat map of ${row.photo}`, "Photo and heat map"));
    if (row.files.mask) pictures.append(figure(row.files.mask, `defect mask of ${row.photo}`, "Defect mask"));
    for (const crop of row.evidence) {
      if (!crop.url) continue;
      const source = crop.training_image.split("/").pop();
      pictures.append(figure(crop.url, "anomalous patch beside its nearest normal patch",
        `distance ${formatScore(crop.distance)} – nearest normal: ${source}`));
    }
    if (pictures.children.length) item.append(pictures);
    const reviews = (row.reviews || []).map((review) => {
      const taught = review.taught_version ? `, taught in version ${review.taught_version} by ${review.taught_by}` : "";
      return `${REVIEW_TEXT[review.verdict]} by ${review.who}${review.who_verified ? " (token)" : ""}, ` +
        `${new Date(review.at).toLocaleString()}${taught}`;
    });
    if (reviews.length) item.append(element("p", "muted reviews", reviews.join("; ")));
    if (row.verdict !== "error") {
      const actions = element("div", "actions");
      for (const verdict of ["false_alarm", "confirmed_defect"]) {
        const button = element("button", `mark ${verdict}`, `Mark: ${REVIEW_TEXT[verdict].toLowerCase()}`);
        button.type = "button";
        button.dataset.verdict = verdict;
        button.addEventListener("click", () => markReview(row, verdict));
        actions.append(button);
      }
      item.append(actions);
    }
    return item;
  }

  async function markReview(row, verdict) {
    const token = sessionStorage.getItem(TOKEN_KEY);
    const who = $("reviewer").value.trim();
    if (!token && !who) {
      lineStatus("h-status", "Type your name first: it is recorded with your review.", true);
      $("reviewer").focus();
      return;
    }
    if (who) localStorage.setItem(NAME_KEY, who);
    const headers = { "Content-Type": "application/json" };
    if (token) headers.Authorization = `Bearer ${token}`;
    try {
      const body = await getJson(`/v1/history/inspections/${row.id}/reviews`, {
        method: "POST", headers, body: JSON.stringify(who ? { verdict, who } : { verdict }),
      });
      await refreshHistory(`${row.photo}: ${REVIEW_TEXT[verdict].toLowerCase()}, recorded for ${body.review.who}.`);
    } catch (err) {
      if (err.status === 401 && token) { sessionStorage.removeItem(TOKEN_KEY); showTeachIn(); }
      lineStatus("h-status", `${row.photo}: ${err.message}`, true);
    }
  }

  async function refreshQueue() {
    const model = $("h-model").value;
    const list = $("queue");
    try {
      const body = await getJson(`/v1/history/queue${model ? `?model=${encodeURIComponent(model)}` : ""}`);
      list.replaceChildren(...body.entries.map((entry) => {
        const item = element("li", entry.available ? "" : "unavailable");
        item.dataset.id = String(entry.inspection.id);
        if (entry.inspection.files.overlay) {
          const img = element("img");
          img.src = entry.inspection.files.overlay;
          img.alt = `heat map of ${entry.inspection.photo}`;
          item.append(img);
        }
        item.append(element("span", "", `${entry.inspection.photo} (${entry.inspection.model}, score ` +
          `${formatScore(entry.inspection.score)}) – false alarm by ${entry.review.who}` +
          (entry.available ? "" : ` – cannot be taught: ${entry.problem}`)));
        return item;
      }));
      const count = body.entries.length;
      $("queue-note").textContent = count === 0 ? "Nothing waits to be taught." :
        model ? `${count} waiting for ${model}.` : `${count} waiting. Choose a model above to apply its queue.`;
      $("apply-queue").disabled = count === 0 || !model;
    } catch (err) {
      $("queue-note").textContent = `Could not read the queue: ${err.message}`;
    }
  }

  async function applyQueue() {
    const token = sessionStorage.getItem(TOKEN_KEY);
    const model = $("h-model").value;
    if (!token || !model) return;
    lineStatus("queue-status", "Teaching…", false);
    try {
      const body = await getJson(`/v1/history/queue/apply?model=${encodeURIComponent(model)}`, {
        method: "POST", headers: { Authorization: `Bearer ${token}` },
      });
      const left = body.left_in_queue ? ` ${body.left_in_queue} left in the queue: apply again.` : "";
      lineStatus("queue-status", `Taught ${body.taught_inspections.length} photos as good: ${model} is now ` +
        `version ${body.version} (by ${body.who}).${left}`, false);
      await loadModels();
      await refreshHistory();
    } catch (err) {
      if (err.status === 401) { sessionStorage.removeItem(TOKEN_KEY); showTeachIn(); }
      lineStatus("queue-status", err.message, true);
    }
  }

  function percent(share) {
    return share == null ? "–" : `${(100 * share).toFixed(1)}%`;
  }

  async function refreshDrift() {
    const panel = $("drift");
    try {
      const body = await getJson("/v1/history/drift");
      panel.replaceChildren(...Object.values(body.models).map((drift) => {
        const box = element("div", "model");
        box.dataset.model = drift.model;
        const q = drift.quantiles;
        const flagged = drift.flagged == null ? "no threshold: nothing flagged" :
          `${drift.flagged} of the last ${drift.verdicts} flagged (${percent(drift.flagged_share)}); ` +
          `calibration expected ${drift.expected_share == null ? "no rate" : `at most ${percent(drift.expected_share)}`}`;
        box.append(element("div", "", `Drift of ${drift.model} (version ${drift.version}): ${flagged}. ` +
          (q.p50 == null ? "" : `Scores: median ${formatScore(q.p50)}, 90% ${formatScore(q.p90)}, 99% ${formatScore(q.p99)}.`)),
        element("div", "muted", drift.expected_basis));
        if (drift.warning) {
          const warning = element("div", "warning", `Warning: ${drift.warning}`);
          warning.setAttribute("role", "alert");
          box.append(warning);
        }
        return box;
      }));
    } catch (err) {
      panel.replaceChildren(element("div", "muted", `Drift: ${err.message}`));
    }
  }

  $("show-inspect").addEventListener("click", () => showView("inspect"));
  $("show-history").addEventListener("click", () => showView("history"));
  $("history-filters").addEventListener("submit", (event) => {
    event.preventDefault();
    historyOffset = 0;
    refreshHistory();
  });
  $("h-newer").addEventListener("click", () => { historyOffset = Math.max(0, historyOffset - PAGE_SIZE); refreshHistory(); });
  $("h-older").addEventListener("click", () => { historyOffset += PAGE_SIZE; refreshHistory(); });
  $("reviewer").value = localStorage.getItem(NAME_KEY) || "";
  $("queue-token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const token = $("queue-token").value.trim();
    if (!token) return;
    sessionStorage.setItem(TOKEN_KEY, token);
    $("queue-token").value = "";
    showTeachIn();
  });
  $("queue-forget-token").addEventListener("click", () => { sessionStorage.removeItem(TOKEN_KEY); showTeachIn(); });
  $("apply-queue").addEventListener("click", applyQueue);
  showTeachIn();
  offerHistory();
  loadModels();
})();
