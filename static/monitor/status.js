// Status page: when the server says a new snapshot landed, swap in the fresh page fragment (no reload).
(function () {
  "use strict";
  const root = document.getElementById("status");
  if (!root) return;
  let current = root.dataset.snapshot || "";
  let delay = 1000;
  let refreshing = false;

  async function refresh() {
    if (refreshing) return;
    refreshing = true;
    try {
      const response = await fetch(root.dataset.fragmentUrl, { headers: { Accept: "text/html" } });
      if (response.ok) {
        root.innerHTML = await response.text();
        const marker = root.querySelector("[data-snapshot-id]");
        current = marker ? marker.dataset.snapshotId : current;
        root.dataset.snapshot = current;
      }
    } finally {
      refreshing = false;
    }
  }

  function connect() {
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    const socket = new WebSocket(scheme + "://" + location.host + root.dataset.socketPath);
    socket.onopen = function () { delay = 1000; };
    socket.onmessage = function (event) {
      let message;
      try { message = JSON.parse(event.data); } catch (e) { return; }
      if (message && message.type === "snapshot" && String(message.id) !== current) refresh();
    };
    socket.onclose = function () {
      setTimeout(connect, delay);
      delay = Math.min(delay * 2, 30000);
    };
  }
  connect();
})();
