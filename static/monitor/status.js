// Status page: when the server says a new snapshot landed, swap in the fresh page fragment (no reload).
(function () {
  "use strict";
  const root = document.getElementById("status");
  if (!root) return;
  let current = root.dataset.snapshot || "";
  let delay = 1000;
  let refreshing = false;

  function rowKey(row) {
    const section = row.closest("[data-dht-prefix]");
    return (section ? section.dataset.dhtPrefix : "") + " " + row.dataset.peerId;
  }

  async function refresh() {
    if (refreshing) return;
    refreshing = true;
    try {
      const response = await fetch(root.dataset.fragmentUrl, { headers: { Accept: "text/html" } });
      if (response.ok) {
        const expanded = Array.from(root.querySelectorAll("tr.server.expanded"), rowKey);
        root.innerHTML = await response.text();
        root.querySelectorAll("tr.server").forEach(function (row) {
          if (expanded.includes(rowKey(row))) row.querySelector("button.expand").click();
        });
        const marker = root.querySelector("[data-snapshot-id]");
        current = marker ? marker.dataset.snapshotId : current;
        root.dataset.snapshot = current;
      }
    } finally {
      refreshing = false;
    }
  }

  // A server row's button shows or hides the detail row under it (delegated: rows are swapped in).
  root.addEventListener("click", function (event) {
    const button = event.target.closest("button.expand");
    if (!button || !root.contains(button)) return;
    const detail = button.closest("tr").nextElementSibling;
    if (!detail || !detail.classList.contains("server-detail")) return;
    const open = detail.hidden;
    detail.hidden = !open;
    button.setAttribute("aria-expanded", String(open));
    button.closest("tr").classList.toggle("expanded", open);
  });

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
