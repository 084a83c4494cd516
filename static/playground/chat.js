// Chat page: one websocket to /api/v2/generate, one inference session per chat.
// Everything that came from the network (model text, peer ids, errors) is shown with
// textContent, never as HTML.
"use strict";

(() => {
  const config = JSON.parse(document.getElementById("playground-config").textContent);
  const $ = (id) => document.getElementById(id);
  const ui = {
    model: $("model"), status: $("model-status"), messages: $("messages"), error: $("chat-error"),
    form: $("composer"), prompt: $("prompt"), send: $("send"), stop: $("stop"), newChat: $("new-chat"),
    doSample: $("do-sample"), temperature: $("temperature"), topP: $("top-p"), topK: $("top-k"),
    repetitionPenalty: $("repetition-penalty"), maxNewTokens: $("max-new-tokens"),
  };

  let socket = null;      // the open WebSocket, or null
  let sessionModel = null; // model of the session open on `socket`
  let waiting = null;     // {resolve, reject} of the open_inference_session in flight
  let reply = null;       // the assistant message being streamed
  const availability = {};

  const modelConfig = () => config.models.find((m) => m.name === ui.model.value);

  function applyDefaults() {
    const d = modelConfig().defaults;
    ui.doSample.checked = d.do_sample;
    ui.temperature.value = d.temperature;
    ui.topP.value = d.top_p;
    ui.topK.value = d.top_k;
    ui.repetitionPenalty.value = d.repetition_penalty;
    ui.maxNewTokens.max = config.max_new_tokens;
    ui.maxNewTokens.value = Math.min(d.max_new_tokens, config.max_new_tokens);
    ui.prompt.maxLength = config.max_input_chars;
    showAvailability();
  }

  // ----- availability -----

  async function refreshAvailability() {
    try {
      const response = await fetch("/api/v1/models", { headers: { Accept: "application/json" } });
      const body = await response.json();
      for (const row of body.models || []) availability[row.name] = row;
    } catch (e) {
      // The page works without it; the status line just stays "unknown".
    }
    for (const option of ui.model.options) {
      const row = availability[option.value];
      const name = config.models.find((m) => m.name === option.value).display_name;
      option.textContent = row ? `${name} — ${row.state}` : name;
    }
    showAvailability();
  }

  function showAvailability() {
    const row = availability[ui.model.value];
    ui.status.dataset.state = row ? row.state : "unknown";
    if (!row) {
      ui.status.textContent = "Checking which servers are online…";
      return;
    }
    const when = row.checked_at ? new Date(row.checked_at * 1000).toLocaleTimeString() : "";
    const source = row.source === "monitor" ? "status monitor" : "swarm";
    ui.status.textContent = `${row.message} (${source}${when ? ", " + when : ""})`;
  }

  // ----- messages -----

  function addMessage(role, text) {
    const element = document.createElement("div");
    element.className = `message ${role}`;
    const body = document.createElement("div");
    body.className = "text";
    body.textContent = text;
    element.append(body);
    ui.messages.append(element);
    element.scrollIntoView({ block: "end" });
    return element;
  }

  function showError(text) {
    ui.error.textContent = text;
    ui.error.hidden = !text;
  }

  function shortPeer(peerId) {
    return peerId.length > 14 ? `${peerId.slice(0, 6)}…${peerId.slice(-6)}` : peerId;
  }

  function describeReply(element, message) {
    const meta = document.createElement("div");
    meta.className = "meta";
    const parts = [`${message.reply_tokens} tokens`];
    if (message.tokens_per_second != null) parts.push(`${message.tokens_per_second.toFixed(1)} tokens/s`);
    if (message.stop_reason === "cancelled") parts.push("stopped");
    if (message.stop_reason === "length") parts.push("length limit");
    meta.append(parts.join(" · "));
    if (message.route && message.route.length) {
      meta.append(" · route: ");
      message.route.forEach((span, index) => {
        if (index) meta.append(" → ");
        const peer = document.createElement("span");
        peer.className = "peer";
        peer.title = String(span.peer_id);
        peer.textContent = shortPeer(String(span.peer_id));
        meta.append(peer, ` blocks ${span.start}–${span.end - 1}`);
      });
    }
    element.append(meta);
  }

  function setBusy(busy) {
    ui.send.disabled = busy;
    ui.stop.hidden = !busy;
  }

  function finishReply(state) {
    if (!reply) return;
    reply.dataset.state = state;
    reply = null;
    setBusy(false);
  }

  // ----- the websocket -----

  function connect() {
    return new Promise((resolve, reject) => {
      const scheme = location.protocol === "https:" ? "wss" : "ws";
      const ws = new WebSocket(`${scheme}://${location.host}/api/v2/generate`);
      ws.onopen = () => resolve(ws);
      ws.onerror = () => reject(new Error("could not connect to the server"));
      ws.onmessage = (event) => onMessage(JSON.parse(event.data));
      ws.onclose = () => {
        if (socket === ws) {
          socket = null;
          sessionModel = null;
        }
        if (waiting) waiting.reject(new Error("the connection closed"));
        if (reply) {
          showError("The connection to the server closed; your next message starts a new chat.");
          finishReply("error");
        }
      };
    });
  }

  function onMessage(message) {
    if (waiting) {
      const pending = waiting;
      waiting = null;
      if (message.ok) pending.resolve();
      else pending.reject(new Error(message.traceback || "could not open a session"));
      return;
    }
    if (!message.ok) {
      showError(message.traceback || "Something went wrong.");
      finishReply("error");
      return;
    }
    if (!reply) return;
    const text = reply.querySelector(".text");
    if (message.outputs) text.append(message.outputs);
    reply.dataset.chunks = String(Number(reply.dataset.chunks || 0) + 1);
    reply.dataset.tokens = String(Number(reply.dataset.tokens || 0) + (message.token_count || 0));
    if (message.stop) {
      describeReply(reply, message);
      finishReply(message.stop_reason === "cancelled" ? "stopped" : "done");
    }
  }

  async function openSession() {
    if (!socket || socket.readyState !== WebSocket.OPEN) {
      socket = await connect();
      sessionModel = null;
    }
    if (sessionModel === ui.model.value) return;
    await new Promise((resolve, reject) => {
      waiting = { resolve, reject };
      socket.send(JSON.stringify({
        type: "open_inference_session", model: ui.model.value, max_length: modelConfig().max_length,
      }));
    });
    sessionModel = ui.model.value;
  }

  function samplingParameters() {
    const number = (input) => (input.value === "" ? undefined : Number(input.value));
    const params = {
      max_new_tokens: number(ui.maxNewTokens),
      do_sample: ui.doSample.checked ? 1 : 0,
      repetition_penalty: number(ui.repetitionPenalty),
    };
    if (ui.doSample.checked) {
      params.temperature = number(ui.temperature);
      params.top_p = number(ui.topP);
      params.top_k = number(ui.topK);
    }
    return params;
  }

  async function send(text) {
    showError("");
    setBusy(true);
    try {
      await openSession();
    } catch (e) {
      showError(e.message);
      setBusy(false);
      return;
    }
    addMessage("user", text);
    reply = addMessage("assistant", "");
    reply.dataset.state = "streaming";
    socket.send(JSON.stringify({ type: "generate", user_message: text, ...samplingParameters() }));
  }

  function newChat() {
    if (socket) socket.close(); // the server stops generating and frees the session's caches
    socket = null;
    sessionModel = null;
    reply = null;
    ui.messages.replaceChildren();
    showError("");
    setBusy(false);
  }

  // ----- wiring -----

  ui.form.addEventListener("submit", (event) => {
    event.preventDefault();
    const text = ui.prompt.value.trim();
    if (!text || reply) return;
    ui.prompt.value = "";
    send(text);
  });
  ui.prompt.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) {
      event.preventDefault();
      ui.form.requestSubmit();
    }
  });
  ui.stop.addEventListener("click", () => {
    if (socket && reply) socket.send(JSON.stringify({ type: "stop" }));
  });
  ui.newChat.addEventListener("click", newChat);
  ui.model.addEventListener("change", () => {
    newChat();
    applyDefaults();
  });

  applyDefaults();
  refreshAvailability();
  setInterval(refreshAvailability, 30000);
})();
