// tokenwarden dashboard: live updates over server-sent events. The page is
// complete without this script; it only swaps in the server's fresh render
// of the live part after each ledger commit and ticks the reset countdown.
(function () {
  "use strict";
  var live = document.getElementById("live");
  var status = document.getElementById("live-status");
  if (!live) return;

  function pad(n) { return (n < 10 ? "0" : "") + n; }
  function tick() {
    var els = document.querySelectorAll("[data-reset-at]");
    for (var i = 0; i < els.length; i++) {
      var s = Math.max(0, Math.round((Number(els[i].getAttribute("data-reset-at")) - Date.now()) / 1000));
      els[i].textContent = Math.floor(s / 3600) + "h " + pad(Math.floor(s % 3600 / 60)) + "m " + pad(s % 60) + "s";
    }
  }
  setInterval(tick, 1000);

  if (!window.EventSource) return;
  var source = new EventSource("/dashboard/events");
  source.addEventListener("update", function (event) {
    live.innerHTML = event.data;
    document.body.setAttribute("data-updated", String(Date.now()));
    if (status) { status.textContent = "live"; status.className = "status live"; }
    tick();
  });
  source.onerror = function () {
    if (status) { status.textContent = "reconnecting"; status.className = "status"; }
  };
})();
