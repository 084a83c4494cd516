// The site's one notation for block ranges and one time format, for scripts
// (the server side is config/formatting.py): blocks as Python slices, end exclusive
// ("0:8", as --block-indices takes them), times as "2025-01-31 12:34:56 UTC".
"use strict";

window.siteFormat = Object.freeze({
  blockRange(start, end) {
    return `${start}:${end}`;
  },
  // unix seconds (or a Date) → "YYYY-MM-DD HH:MM:SS UTC"
  utcTime(moment) {
    const date = moment instanceof Date ? moment : new Date(Number(moment) * 1000);
    if (Number.isNaN(date.getTime())) return "";
    return `${date.toISOString().slice(0, 19).replace("T", " ")} UTC`;
  },
});
