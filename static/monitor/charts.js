// Draws the plotly figures that the page embeds (json_script "chart-data"); on a model page the
// time-range links fetch fresh figures from the history API instead of reloading the page.
(function () {
  "use strict";
  const source = document.getElementById("chart-data");
  if (!source || !window.Plotly) return;
  const data = JSON.parse(source.textContent);
  // No mode bar: on a phone it covers the titles, and the charts need no zoom tools to be read.
  const config = { responsive: true, displaylogo: false, displayModeBar: false };

  function draw(figures) {
    document.querySelectorAll("[data-chart]").forEach(function (element) {
      const figure = figures[element.dataset.chart];
      if (figure) Plotly.react(element, figure.data, figure.layout, config);
    });
  }
  draw(data.figures);

  if (!data.history_url) return;
  document.querySelectorAll("[data-range]").forEach(function (link) {
    link.addEventListener("click", async function (event) {
      event.preventDefault();
      const range = link.dataset.range;
      const response = await fetch(data.history_url + "?since=" + encodeURIComponent(range));
      if (!response.ok) return;
      const history = await response.json();
      draw(history.figures);
      document.querySelectorAll("[data-range]").forEach(function (other) {
        other.classList.toggle("selected", other === link);
      });
      const summary = document.querySelector("[data-range-summary]");
      if (summary) {
        const overall = history.availability.overall;
        summary.textContent = history.snapshots + " crawls" +
          (overall === null ? "" : ", available " + (overall * 100).toFixed(1) + "% of the observed time");
      }
      window.history.replaceState(null, "", "?range=" + encodeURIComponent(range));
    });
  });
})();
