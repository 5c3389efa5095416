// kiln dashboard: keeps the page's live part current from Server-Sent
// Events (/api/v1/events); every event carries the part's new HTML,
// rendered by the coordinator. No framework, no build step.
"use strict";
(function () {
  // A preview the coordinator does not have yet (404) is hidden, not broken.
  document.addEventListener("error", function (e) {
    var t = e.target;
    if (t && t.tagName === "IMG" && t.classList.contains("preview")) {
      t.classList.add("missing");
    }
  }, true);
  var live = document.querySelector("[data-live]");
  if (!live || !window.EventSource) return;
  var source = new EventSource(live.getAttribute("data-live"));
  source.addEventListener("html", function (e) {
    // Keep what the user has opened (failed tasks' details) across updates.
    var open = {};
    live.querySelectorAll("details[open] > summary").forEach(function (s) {
      open[s.textContent] = true;
    });
    live.innerHTML = e.data;
    live.querySelectorAll("details > summary").forEach(function (s) {
      if (open[s.textContent]) s.parentNode.open = true;
    });
    document.body.setAttribute("data-updated", String(Date.now()));
  });
  source.addEventListener("logout", function () {
    source.close();
    window.location.assign("/login");
  });
})();
