// Status page: when the server says a new snapshot landed, swap in the fresh page fragment (no reload).
(function () {
  "use strict";
  const root = document.getElementById("status");
  if (!root) return;
  let current = root.dataset.snapshot || "";
  let delay = 1000;
  let refreshing = false;
  let pending = null; // the jittered fetch waiting to start
  let staleTimer = null;
  // Every open page hears of a new snapshot at once: each waits a random moment, so that thousands of
  // them do not fetch the fragment in the same instant.
  const jitterMs = Math.max(parseFloat(root.dataset.refreshJitter) || 0, 0) * 1000;

  function rowKey(row) {
    const section = row.closest("[data-dht-prefix]");
    return (section ? section.dataset.dhtPrefix : "") + " " + row.dataset.peerId;
  }

  // The fragment says whether its report is stale, and in how many seconds it will be if no crawl lands
  // (no push comes when the crawls stop): the page marks itself stale then, and after every swap again.
  function markStale(stale) {
    root.classList.toggle("is-stale", stale);
    const banner = root.querySelector("[data-stale-banner]");
    if (banner) banner.hidden = !stale;
  }

  function watchStaleness() {
    clearTimeout(staleTimer);
    const summary = root.querySelector("[data-stale]");
    if (!summary) return markStale(false);
    const stale = summary.dataset.stale === "true";
    markStale(stale);
    const staleIn = parseFloat(summary.dataset.staleIn);
    if (!stale && isFinite(staleIn)) staleTimer = setTimeout(function () { markStale(true); }, staleIn * 1000);
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
        watchStaleness();
      }
    } finally {
      refreshing = false;
    }
  }

  function refreshSoon() {
    if (pending !== null) return; // one fetch after the wait takes whatever snapshot is latest then
    pending = setTimeout(function () {
      pending = null;
      refresh();
    }, Math.random() * jitterMs);
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
      if (message && message.type === "snapshot" && String(message.id) !== current) refreshSoon();
    };
    socket.onclose = function (event) {
      // 4429: this address (or everyone) has too many pages open; try again much later. Random waits:
      // the pages a restarted site dropped do not all come back at once.
      const wait = event.code === 4429 ? 60000 + Math.random() * 60000 : delay * (0.5 + Math.random());
      setTimeout(connect, wait);
      delay = Math.min(delay * 2, 30000);
    };
  }
  watchStaleness();
  connect();
})();
