// Chat page: one websocket to /api/v2/generate, one inference session per chat.
// Chats live in this browser (localStorage): a reload, or switching to an older chat, opens a
// new session that carries the chat's system prompt and history, and the servers pick up from there.
// A chat too long for that goes on without its oldest messages, and the page says so; a chat whose
// model the site no longer offers goes on with another. The server closes a socket left idle (code
// 4000): the next message simply opens a new one.
// Everything that came from the network (model text, peer ids and names, errors) is shown with
// textContent, never as HTML.
"use strict";

(() => {
  const config = JSON.parse(document.getElementById("playground-config").textContent);
  const format = window.siteFormat;
  const $ = (id) => document.getElementById(id);
  const ui = {
    model: $("model"), status: $("model-status"), messages: $("messages"), error: $("chat-error"), note: $("chat-note"),
    form: $("composer"), prompt: $("prompt"), send: $("send"), stop: $("stop"), newChat: $("new-chat"),
    system: $("system-prompt"), chatList: $("chat-list"), samplingError: $("sampling-error"),
    doSample: $("do-sample"), temperature: $("temperature"), topP: $("top-p"), topK: $("top-k"),
    repetitionPenalty: $("repetition-penalty"), maxNewTokens: $("max-new-tokens"),
  };
  const SAMPLED = [ui.temperature, ui.topP, ui.topK]; // ignored (and disabled) in greedy mode
  const LIMITED = { temperature: ui.temperature, top_p: ui.topP, top_k: ui.topK, repetition_penalty: ui.repetitionPenalty };
  const STORAGE_KEY = "swarm-chats-v1";
  const MAX_CHATS = 50;
  const IDLE_CLOSE = 4000; // the server's close code for a socket left idle: not an error

  let socket = null;        // the open WebSocket, or null
  let sessionChat = null;   // id of the chat whose conversation the socket's session holds, in sync
  let waiting = null;       // {resolve, reject} of the open_inference_session in flight
  let reply = null;         // {chat, message, element} of the reply being streamed
  const availability = {};

  const modelConfig = (name = ui.model.value) => config.models.find((m) => m.name === name);
  const modelName = (name) => (modelConfig(name) ? modelConfig(name).display_name : name);

  // ----- chats in localStorage -----

  const store = loadStore();

  function newId() {
    return `${Date.now().toString(36)}-${Math.random().toString(36).slice(2, 8)}`;
  }

  function validMessage(m) {
    return m && (m.role === "user" || m.role === "assistant") && typeof m.content === "string";
  }

  function loadStore() {
    let data = null;
    try {
      data = JSON.parse(localStorage.getItem(STORAGE_KEY) || "null");
    } catch (e) {
      data = null; // unreadable: start afresh rather than break the page
    }
    const chats = Array.isArray(data && data.chats) ? data.chats : [];
    const valid = chats.filter((c) => c && typeof c.id === "string" && typeof c.model === "string"
      && Array.isArray(c.messages) && c.messages.every(validMessage));
    for (const chat of valid) {
      chat.system = typeof chat.system === "string" ? chat.system : "";
      chat.dropped = Number.isInteger(chat.dropped) ? chat.dropped : 0;
      adoptModel(chat);
      for (const m of chat.messages) if (m.state === "streaming") m.state = "stopped"; // the page went away mid-reply
    }
    const current = valid.some((c) => c.id === (data && data.current)) ? data.current : null;
    return { chats: valid, current };
  }

  // A chat whose model is no longer offered (renamed or removed in the site's catalog) is kept: it goes
  // on with the first model offered and remembers which model it was with.
  function adoptModel(chat) {
    if (modelConfig(chat.model) || !config.models.length) return;
    chat.formerModel = chat.formerModel || chat.model;
    chat.model = config.models[0].name;
  }

  function save() {
    store.chats.sort((a, b) => (b.updated || 0) - (a.updated || 0));
    store.chats.splice(MAX_CHATS);
    try {
      localStorage.setItem(STORAGE_KEY, JSON.stringify(store));
    } catch (e) {
      showError("This browser could not store the chat (storage full?); delete some old chats.");
    }
  }

  function currentChat() {
    return store.chats.find((c) => c.id === store.current) || null;
  }

  function createChat() {
    const chat = { id: newId(), title: "", model: ui.model.value, system: ui.system.value, messages: [], updated: Date.now() / 1000 };
    store.chats.unshift(chat);
    store.current = chat.id;
    return chat;
  }

  function chatTitle(chat) {
    if (chat.title) return chat.title;
    const first = chat.messages.find((m) => m.role === "user");
    return first ? first.content.slice(0, 60) : "New chat";
  }

  // ----- the chat list -----

  function renderChatList() {
    ui.chatList.replaceChildren();
    for (const chat of store.chats) {
      const item = document.createElement("li");
      item.className = "chat-item";
      item.dataset.chatId = chat.id;
      if (chat.id === store.current) item.setAttribute("aria-current", "true");
      const open = document.createElement("button");
      open.type = "button";
      open.className = "open-chat";
      const title = document.createElement("span");
      title.className = "chat-title";
      title.textContent = chatTitle(chat);
      const when = document.createElement("span");
      when.className = "chat-time";
      when.textContent = `${modelName(chat.model)} · ${format.utcTime(chat.updated)}`;
      open.append(title, when);
      open.addEventListener("click", () => switchChat(chat.id));
      const remove = document.createElement("button");
      remove.type = "button";
      remove.className = "delete-chat secondary";
      remove.title = "Delete this chat";
      remove.setAttribute("aria-label", `Delete chat ${chatTitle(chat)}`);
      remove.textContent = "×";
      remove.addEventListener("click", () => deleteChat(chat.id));
      item.append(open, remove);
      ui.chatList.append(item);
    }
  }

  function leaveSession() {
    // The server stops generating and frees the session's caches when the socket closes.
    if (reply) {
      reply.message.state = "stopped";
      reply = null;
    }
    if (socket) socket.close();
    socket = null;
    sessionChat = null;
    setBusy(false);
  }

  function showChat() {
    const chat = currentChat();
    ui.messages.replaceChildren();
    showError("");
    if (chat) {
      if (chat.model !== ui.model.value) {
        ui.model.value = chat.model;
        applyDefaults();
      }
      ui.system.value = chat.system;
      chat.messages.forEach((message) => renderMessage(message));
    }
    showNote(chat);
    renderChatList();
    updateActions();
  }

  // What the model does not see of this chat, or that it changed models: said once, above the messages.
  function showNote(chat) {
    const notes = [];
    if (chat && chat.formerModel) {
      notes.push(`This chat was with “${chat.formerModel}”, which this site no longer offers; it goes on with ${modelName(chat.model)}.`);
    }
    const dropped = chat ? Math.min(chat.dropped || 0, chat.messages.length) : 0;
    if (dropped) {
      notes.push(`This chat is longer than the model can take in: its ${dropped} oldest messages are left out, and the model answers from the later ones.`);
    }
    ui.note.textContent = notes.join(" ");
    ui.note.hidden = !notes.length;
    ui.messages.querySelectorAll(".message").forEach((element, index) => {
      if (index < dropped) element.dataset.context = "out";
      else delete element.dataset.context;
    });
  }

  function switchChat(id) {
    if (id === store.current) return;
    leaveSession();
    save();
    store.current = id;
    save();
    showChat();
  }

  function deleteChat(id) {
    if (id === store.current) {
      leaveSession();
      store.current = null;
    }
    store.chats = store.chats.filter((c) => c.id !== id);
    save();
    showChat();
  }

  function newChat() {
    leaveSession();
    const chat = currentChat();
    if (chat && !chat.messages.length) {
      chat.model = ui.model.value; // an empty chat is reused, not piled up
      delete chat.formerModel;
    } else {
      store.current = null;
    }
    save();
    showChat();
  }

  // ----- sampling inputs -----

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
    ui.system.maxLength = config.max_input_chars;
    for (const [key, input] of Object.entries(LIMITED)) {
      const limit = config.sampling_limits[key];
      input.max = limit.max;
      input.min = limit.min;
    }
    applyMode();
    showAvailability();
  }

  function applyMode() {
    for (const input of SAMPLED) input.disabled = !ui.doSample.checked;
    validateSampling();
  }

  // The same ranges the server checks (it refuses anything else): the first problem, or "".
  function samplingProblem() {
    const fields = Object.entries(LIMITED).filter(([, input]) => !input.disabled);
    for (const [key, input] of fields) {
      if (input.value === "") continue; // the model's default
      const value = Number(input.value);
      const limit = config.sampling_limits[key];
      const low = limit.min_excluded ? value <= limit.min : value < limit.min;
      if (!Number.isFinite(value) || low || value > limit.max || (key === "top_k" && !Number.isInteger(value))) {
        const bound = limit.min_excluded ? `above ${limit.min}` : `at least ${limit.min}`;
        return `${input.dataset.label} must be ${bound} and at most ${limit.max} (got ${input.value}).`;
      }
    }
    const tokens = Number(ui.maxNewTokens.value);
    if (ui.maxNewTokens.value !== "" && (!Number.isInteger(tokens) || tokens < 1 || tokens > config.max_new_tokens)) {
      return `Max new tokens must be a whole number from 1 to ${config.max_new_tokens} (got ${ui.maxNewTokens.value}).`;
    }
    return "";
  }

  function validateSampling() {
    const problem = samplingProblem();
    ui.samplingError.textContent = problem;
    ui.samplingError.hidden = !problem;
    for (const input of [...Object.values(LIMITED), ui.maxNewTokens]) input.removeAttribute("aria-invalid");
    if (problem) {
      const field = [...Object.values(LIMITED), ui.maxNewTokens].find((input) => problem.startsWith(input.dataset.label));
      if (field) field.setAttribute("aria-invalid", "true");
    }
    return problem;
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
      const name = modelConfig(option.value).display_name;
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
    const when = row.checked_at ? format.utcTime(row.checked_at) : "";
    const source = row.source === "monitor" ? "status monitor" : "swarm";
    ui.status.textContent = `${row.message} (${source}${when ? ", " + when : ""})`;
  }

  // ----- messages -----

  function renderMessage(message) {
    const element = document.createElement("div");
    element.className = `message ${message.role}`;
    if (message.state) element.dataset.state = message.state;
    const body = document.createElement("div");
    body.className = "text";
    body.textContent = message.content;
    element.append(body);
    if (message.role === "assistant") {
      if (message.meta) describeReply(element, message.meta);
      const actions = document.createElement("div");
      actions.className = "actions";
      const copy = document.createElement("button");
      copy.type = "button";
      copy.className = "copy secondary small";
      copy.textContent = "Copy";
      copy.addEventListener("click", () => copyText(copy, body.textContent));
      const again = document.createElement("button");
      again.type = "button";
      again.className = "regenerate secondary small";
      again.textContent = "Regenerate";
      again.addEventListener("click", regenerate);
      actions.append(copy, again);
      element.append(actions);
    }
    ui.messages.append(element);
    element.scrollIntoView({ block: "end" });
    return element;
  }

  async function copyText(button, text) {
    try {
      await navigator.clipboard.writeText(text);
    } catch (e) {
      // Without the clipboard API (plain http on another host): a hidden textarea and the old command.
      const area = document.createElement("textarea");
      area.value = text;
      document.body.append(area);
      area.select();
      document.execCommand("copy");
      area.remove();
    }
    button.textContent = "Copied";
    setTimeout(() => { button.textContent = "Copy"; }, 1500);
  }

  function showError(text) {
    ui.error.textContent = text;
    ui.error.hidden = !text;
  }

  function shortPeer(peerId) {
    return `…${peerId.slice(-6)}`; // as the status pages show peer ids
  }

  function describeReply(element, meta) {
    element.querySelector(".meta")?.remove();
    const line = document.createElement("div");
    line.className = "meta";
    const parts = [`${meta.reply_tokens} tokens`];
    if (meta.tokens_per_second != null) parts.push(`${Number(meta.tokens_per_second).toFixed(1)} tokens/s`);
    if (meta.round_trips > 0 && meta.reply_tokens > meta.round_trips) {
      parts.push(`${(meta.reply_tokens / meta.round_trips).toFixed(1)} tokens per round trip`); // a draft's tokens accepted
    }
    if (meta.stop_reason === "cancelled") parts.push("stopped");
    if (meta.stop_reason === "length") parts.push("length limit");
    line.append(parts.join(" · "));
    if (Array.isArray(meta.route) && meta.route.length) {
      line.append(" · route: ");
      meta.route.forEach((span, index) => {
        if (index) line.append(" → ");
        const peer = document.createElement("span");
        peer.className = "peer";
        peer.title = String(span.peer_id);
        peer.textContent = span.public_name ? String(span.public_name) : shortPeer(String(span.peer_id));
        line.append(peer, ` blocks ${format.blockRange(span.start, span.end)}`);
      });
    }
    const actions = element.querySelector(".actions");
    if (actions) element.insertBefore(line, actions);
    else element.append(line);
  }

  function updateActions() {
    const messages = ui.messages.querySelectorAll(".message.assistant");
    messages.forEach((element, index) => {
      const last = index === messages.length - 1;
      const button = element.querySelector(".regenerate");
      button.hidden = !last;
      button.disabled = Boolean(reply);
    });
  }

  function setBusy(busy) {
    ui.send.disabled = busy;
    ui.stop.hidden = !busy;
    updateActions();
  }

  function finishReply(state, meta) {
    if (!reply) return;
    const { chat, message, element } = reply;
    message.state = state;
    element.dataset.state = state;
    if (meta) {
      message.meta = meta;
      describeReply(element, meta);
    }
    chat.updated = Date.now() / 1000;
    reply = null;
    save();
    renderChatList();
    setBusy(false);
  }

  // ----- the websocket -----

  function connect() {
    return new Promise((resolve, reject) => {
      const scheme = location.protocol === "https:" ? "wss" : "ws";
      const ws = new WebSocket(`${scheme}://${location.host}/api/v2/generate`);
      ws.onopen = () => resolve(ws);
      ws.onerror = () => reject(new Error("could not connect to the server"));
      ws.onmessage = (event) => onMessage(ws, JSON.parse(event.data));
      ws.onclose = (event) => {
        if (socket !== ws) return; // a socket we left on purpose
        socket = null;
        sessionChat = null; // the next message opens a new socket and session, quietly (an idle close is no error)
        const idle = event.code === IDLE_CLOSE;
        if (waiting) waiting.reject(Object.assign(new Error("the connection closed"), { idle }));
        if (reply && idle && !reply.message.content && !reply.resent) {
          resend(reply); // closed for idling just as the message went: it goes again on a new socket
          return;
        }
        if (reply) {
          showError("The connection to the server closed; send your message again to continue this chat.");
          finishReply("error");
        }
      };
    });
  }

  function onMessage(ws, message) {
    if (ws !== socket) return;
    if (waiting) {
      const pending = waiting;
      waiting = null;
      if (message.ok) pending.resolve(message);
      else pending.reject(new Error(message.traceback || "could not open a session"));
      return;
    }
    if (!message.ok) {
      showError(message.traceback || "Something went wrong.");
      sessionChat = null; // the server's copy of the chat may differ now: resend it with the next message
      finishReply("error");
      return;
    }
    if (!reply) return;
    const { message: stored, element } = reply;
    if (message.outputs) {
      stored.content += message.outputs;
      element.querySelector(".text").append(message.outputs);
    }
    element.dataset.chunks = String(Number(element.dataset.chunks || 0) + 1);
    element.dataset.tokens = String(Number(element.dataset.tokens || 0) + (message.token_count || 0));
    if (message.stop) {
      const meta = {
        reply_tokens: message.reply_tokens, tokens_per_second: message.tokens_per_second,
        stop_reason: message.stop_reason, route: message.route, round_trips: message.round_trips,
      };
      finishReply(message.stop_reason === "cancelled" ? "stopped" : "done", meta);
    }
  }

  // Whole exchanges (a user message and the reply to it) of `messages` for a new session: the latest
  // that the server's limits on a history allow. {turns, dropped: how many messages were left out}.
  function history(messages, system) {
    const pairs = [];
    for (let i = 0; i + 1 < messages.length; i += 2) {
      if (messages[i].role !== "user" || messages[i + 1].role !== "assistant") break;
      pairs.push([messages[i].content, messages[i + 1].content]);
    }
    let chars = pairs.reduce((sum, [user, assistant]) => sum + user.length + assistant.length, 0);
    const budget = config.max_history_chars - system.length;
    let start = 0;
    while (start < pairs.length && (chars > budget || 2 * (pairs.length - start) > config.max_history_messages)) {
      chars -= pairs[start][0].length + pairs[start][1].length;
      start += 1;
    }
    const turns = pairs.slice(start).flatMap(([user, assistant]) => [
      { role: "user", content: user }, { role: "assistant", content: assistant },
    ]);
    return { turns, dropped: 2 * start };
  }

  // A session holding `chat` up to (not including) `upTo` messages. The server may leave out more of
  // its oldest messages (its tokens, not characters, decide); the page shows how many are out.
  async function openSession(chat, upTo, retried = false) {
    if (!socket || socket.readyState !== WebSocket.OPEN) {
      socket = await connect();
      sessionChat = null;
    }
    const { turns, dropped } = history(chat.messages.slice(0, upTo), chat.system);
    let answer;
    try {
      answer = await new Promise((resolve, reject) => {
        waiting = { resolve, reject };
        socket.send(JSON.stringify({
          type: "open_inference_session", model: chat.model, max_length: modelConfig(chat.model).max_length,
          system_prompt: chat.system, history: turns,
        }));
      });
    } catch (e) {
      if (e.idle && !retried) return openSession(chat, upTo, true); // closed for idling just as we spoke
      throw e;
    }
    sessionChat = chat.id;
    chat.dropped = dropped + (answer.dropped_messages || 0);
    if (chat.id === store.current) showNote(chat);
  }

  function startReply(chat) {
    const message = { role: "assistant", content: "", state: "streaming" };
    chat.messages.push(message);
    const element = renderMessage(message);
    reply = { chat, message, element, sampling: samplingParameters(), resent: false };
    setBusy(true);
  }

  // The reply's request again, in a new session holding the chat up to its user message.
  async function resend(pending) {
    pending.resent = true;
    const { chat } = pending;
    try {
      await openSession(chat, chat.messages.length - 2);
      const user = chat.messages[chat.messages.length - 2];
      socket.send(JSON.stringify({ type: "generate", user_message: user.content, ...pending.sampling }));
    } catch (e) {
      if (reply !== pending) return;
      showError(e.message);
      finishReply("error");
    }
  }

  async function send(text) {
    showError("");
    const problem = validateSampling();
    if (problem) {
      showError(problem);
      return false;
    }
    const chat = currentChat() || createChat();
    if (chat.system !== ui.system.value) {
      chat.system = ui.system.value;
      sessionChat = null; // the servers hold the old system prompt
    }
    setBusy(true);
    try {
      if (sessionChat !== chat.id) await openSession(chat, chat.messages.length);
    } catch (e) {
      showError(e.message);
      setBusy(false);
      return false;
    }
    chat.messages.push({ role: "user", content: text });
    chat.updated = Date.now() / 1000;
    renderMessage(chat.messages[chat.messages.length - 1]);
    startReply(chat);
    save();
    renderChatList();
    socket.send(JSON.stringify({ type: "generate", user_message: text, ...reply.sampling }));
    return true;
  }

  async function regenerate() {
    const chat = currentChat();
    if (reply || !chat || chat.messages.length < 2) return;
    const problem = validateSampling();
    if (problem) {
      showError(problem);
      return;
    }
    showError("");
    const live = sessionChat === chat.id && chat.system === ui.system.value;
    chat.system = ui.system.value;
    chat.messages.pop(); // the reply to replace
    const last = chat.messages[chat.messages.length - 1];
    ui.messages.lastElementChild.remove();
    setBusy(true);
    try {
      // Live session: the servers rewind to the user message. Otherwise: a session up to it.
      if (!live) await openSession(chat, chat.messages.length - 1);
    } catch (e) {
      showError(e.message);
      chat.messages.push({ role: "assistant", content: "", state: "error" });
      renderMessage(chat.messages[chat.messages.length - 1]).dataset.state = "error";
      save();
      setBusy(false);
      return;
    }
    startReply(chat);
    const request = live ? { regenerate: true } : { user_message: last.content };
    socket.send(JSON.stringify({ type: "generate", ...request, ...reply.sampling }));
  }

  // ----- wiring -----

  ui.form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const text = ui.prompt.value.trim();
    if (!text || reply) return;
    const kept = ui.prompt.value;
    ui.prompt.value = "";
    if (!(await send(text))) ui.prompt.value = kept;
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
    const model = ui.model.value;
    applyDefaults();
    newChat();
    const chat = currentChat();
    if (chat) {
      chat.model = model;
      delete chat.formerModel;
    }
  });
  ui.doSample.addEventListener("change", applyMode);
  for (const input of [...Object.values(LIMITED), ui.maxNewTokens]) input.addEventListener("input", validateSampling);
  ui.system.addEventListener("change", () => {
    const chat = currentChat();
    if (chat && chat.system !== ui.system.value) {
      chat.system = ui.system.value;
      sessionChat = null; // the next message opens a session with the new system prompt
      save();
    }
  });
  window.addEventListener("pagehide", save); // a reply cut off by a reload is kept (as stopped)

  const first = currentChat();
  if (first) ui.model.value = first.model;
  applyDefaults();
  showChat();
  refreshAvailability();
  setInterval(refreshAvailability, 30000);
})();
