// The draw-a-digit page: a canvas drawn with Pointer Events (mouse, pen, touch), or an image file, posted to
// TorchServe's predictions API; the answer's digit, probabilities and model version are shown.
"use strict";

(function () {
  // `make serve` answers here; `make ui API=...` (or ?api= in the address) points the page elsewhere.
  const DEFAULT_API = "http://127.0.0.1:8080/predictions/mnist";
  // MNIST strokes are 2-3 px of 28; the canvas is ten times that.
  const LINE_WIDTH = 22;
  const INK = "#000";
  const PAPER = "#fff";
  // A digit of several strokes (a 4, a 7 with a bar) is sent once, this long after its last stroke ends.
  const SETTLE_MS = 250;

  const pad = document.getElementById("pad");
  const pen = pad.getContext("2d");
  const api = document.getElementById("api");
  const status = document.getElementById("status");
  const error = document.getElementById("error");
  const digit = document.getElementById("digit");
  const confidence = document.getElementById("confidence");
  const bars = document.getElementById("bars");
  const modelVersion = document.getElementById("model-version");
  const modelSha256 = document.getElementById("model-sha256");
  const modelSource = document.getElementById("model-source");

  let drawing = null; // the pointer that draws now (one at a time: a second finger does not scribble)
  let last = null;
  let asked = 0; // requests sent; only the newest one's answer is shown
  let settling = null; // the request a lifted pen will send unless another stroke starts

  function clearPad() {
    pen.fillStyle = PAPER; // toDataURL() of an untouched canvas is transparent; the server wants paper
    pen.fillRect(0, 0, pad.width, pad.height);
  }

  function padPoint(event) {
    const box = pad.getBoundingClientRect();
    return {
      x: ((event.clientX - box.left) * pad.width) / box.width,
      y: ((event.clientY - box.top) * pad.height) / box.height,
    };
  }

  function stroke(from, to) {
    pen.strokeStyle = INK;
    pen.lineWidth = LINE_WIDTH;
    pen.lineCap = "round";
    pen.lineJoin = "round";
    pen.beginPath();
    pen.moveTo(from.x, from.y);
    pen.lineTo(to.x, to.y);
    pen.stroke();
  }

  pad.addEventListener("pointerdown", (event) => {
    if (drawing !== null || (event.pointerType === "mouse" && event.button !== 0)) return;
    event.preventDefault();
    clearTimeout(settling);
    pad.setPointerCapture(event.pointerId); // strokes that leave the canvas still end on release
    drawing = event.pointerId;
    last = padPoint(event);
    stroke(last, last); // a tap leaves a dot
  });

  pad.addEventListener("pointermove", (event) => {
    if (event.pointerId !== drawing) return;
    // Browsers merge fast moves into one event per frame; the merged points keep curves round.
    const moves = event.getCoalescedEvents ? event.getCoalescedEvents() : [];
    for (const move of moves.length ? moves : [event]) {
      const point = padPoint(move);
      stroke(last, point);
      last = point;
    }
  });

  function endStroke(event) {
    if (event.pointerId !== drawing) return;
    drawing = null;
    pad.dataset.settling = "true"; // a request is coming
    settling = setTimeout(() => predict(pad.toDataURL("image/png"), "your drawing"), SETTLE_MS);
  }
  pad.addEventListener("pointerup", endStroke);
  pad.addEventListener("pointercancel", endStroke);

  function clearDrawing() {
    clearTimeout(settling); // a blank canvas is no question
    delete pad.dataset.settling;
    clearPad();
    status.textContent = "Cleared. Draw a digit.";
  }

  pad.addEventListener("keydown", (event) => {
    if (["Delete", "Backspace", "Escape"].includes(event.key)) {
      event.preventDefault();
      clearDrawing();
    }
  });
  document.getElementById("clear").addEventListener("click", clearDrawing);

  // --- an image file instead of a drawing ------------------------------------------------------------
  function sendFile(file) {
    if (!file) return;
    const reader = new FileReader();
    reader.onload = () => {
      showOnPad(reader.result);
      predict(reader.result, file.name);
    };
    reader.onerror = () => showError(`Could not read ${file.name}: ${reader.error}`);
    reader.readAsDataURL(file);
  }

  // The file is sent as it is; the canvas shows it (fitted, on white) where the browser can decode it.
  function showOnPad(dataUrl) {
    const image = new Image();
    image.onload = () => {
      clearPad();
      const scale = Math.min(pad.width / image.width, pad.height / image.height);
      const width = image.width * scale;
      const height = image.height * scale;
      pen.drawImage(image, (pad.width - width) / 2, (pad.height - height) / 2, width, height);
    };
    image.src = dataUrl;
  }

  const file = document.getElementById("file");
  file.addEventListener("change", () => {
    sendFile(file.files[0]);
    file.value = ""; // choosing the same file again sends it again
  });
  document.addEventListener("dragover", (event) => event.preventDefault()); // allows the drop
  document.addEventListener("drop", (event) => {
    event.preventDefault();
    sendFile(event.dataTransfer.files[0]);
  });

  // --- asking the server ------------------------------------------------------------------------------
  async function predict(dataUrl, what) {
    const asking = ++asked;
    // With data-answered and data-settling: whether the page has the answer to all that was drawn or sent.
    pad.dataset.asked = String(asking);
    delete pad.dataset.settling;
    const url = api.value.trim();
    status.textContent = `Asking ${url} about ${what}…`;
    let response;
    let text;
    try {
      // JSON with the data URL: what handler/inputs.py reads as a base64 image, whatever the file type.
      response = await fetch(url, {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ data: dataUrl }),
        cache: "no-store",
      });
      text = await response.text();
    } catch (failure) {
      // The browser tells a page nothing more: refused, unreachable and a CORS refusal look the same.
      if (asking === asked) {
        pad.dataset.answered = String(asking);
        showError(
          `Could not reach ${url} (${failure.message}). Is the server running (make serve), and does it allow ` +
            `this page's origin ${location.origin} (cors_allowed_origin)?`,
        );
      }
      return;
    }
    if (asking !== asked) return;
    pad.dataset.answered = String(asking);
    let body = null;
    try {
      body = JSON.parse(text);
    } catch (notJson) {
      body = null;
    }
    if (!response.ok) {
      const reason = body && (body.error || body.message) ? body.error || body.message : text.trim() || "no details";
      showError(`${response.status} ${response.statusText}: ${reason}`.replace(/ {2}/, " "));
      return;
    }
    if (!body || typeof body.digit !== "number" || !body.probabilities) {
      showError(`${response.status}: the answer is not a prediction: ${text.slice(0, 300)}`);
      return;
    }
    showAnswer(body, response.headers, what);
  }

  function showError(message) {
    error.textContent = message;
    error.hidden = false;
    status.textContent = "No answer. Draw again or choose another file.";
    digit.textContent = "–";
    confidence.textContent = "";
    drawBars(null);
  }

  function showAnswer(body, headers, what) {
    error.hidden = true;
    error.textContent = "";
    digit.textContent = String(body.digit);
    confidence.textContent = `(${(100 * body.confidence).toFixed(1)} % sure)`;
    drawBars(body.probabilities, body.digit);
    // The headers are readable only where the server exposes them to the page (Access-Control-Expose-Headers,
    // which TorchServe 0.12 cannot send); the body carries the same two values.
    const fromHeaders = headers.get("X-Model-Version");
    const model = body.model || {};
    modelVersion.textContent = fromHeaders || model.version || "unknown";
    modelSha256.textContent = headers.get("X-Model-Sha256") || model.sha256 || "unknown";
    modelSource.textContent = fromHeaders ? "(from the response headers)" : "(from the answer)";
    status.textContent = `Answered for ${what}: ${body.digit}.`;
  }

  function drawBars(probabilities, best) {
    bars.replaceChildren();
    for (let d = 0; d <= 9; d += 1) {
      const p = probabilities ? Number(probabilities[String(d)] || 0) : 0;
      const item = document.createElement("li");
      item.className = d === best ? "best" : "";
      item.setAttribute("aria-label", `${d}: ${(100 * p).toFixed(1)} %`);
      const label = document.createElement("span");
      label.className = "label";
      label.textContent = String(d);
      const bar = document.createElement("span");
      bar.className = "bar";
      bar.style.width = `${(100 * p).toFixed(1)}%`;
      const value = document.createElement("span");
      value.className = "value";
      value.textContent = probabilities ? `${(100 * p).toFixed(1)} %` : "";
      item.append(label, bar, value);
      bars.append(item);
    }
  }

  api.value = new URLSearchParams(location.search).get("api") || DEFAULT_API;
  document.getElementById("origin").textContent = location.origin;
  clearPad();
  drawBars(null);
})();
