// Hosts OpenAI's ChatKit web component. While ChatKit.js loads, a "Loading ChatKit…"
// status is shown (body[data-chatkit="loading"]). The page falls back to flask-chatkit's
// console when the CDN script cannot load (offline, blocked), hangs, never becomes ready
// within loadTimeoutMs, or ChatKit reports an error meaning its UI cannot work (the
// domain key was refused, or any error before it was ready).
(function () {
  "use strict";
  var cfg = JSON.parse(document.getElementById("chatkit-config").textContent);
  var element = document.getElementById("chatkit");
  var loading = document.getElementById("chatkit-loading");
  var state = "loading"; // loading -> ready | fallback
  // Errors after "ready" that still mean the UI cannot work at all.
  var FATAL = /domain[ _-]?key|domain.*(not allowed|not registered|verif)|unauthori[sz]ed|forbidden|\b40[13]\b/i;

  function setState(next) {
    state = next;
    document.body.dataset.chatkit = next;
    loading.hidden = next !== "loading";
  }

  function fallback(reason) {
    if (state === "fallback") return;
    setState("fallback");
    element.remove();
    var box = document.getElementById("fallback");
    var frame = document.getElementById("console-frame");
    box.hidden = false;
    box.dataset.reason = reason;
    frame.src = frame.dataset.src;
  }

  function errorText(event) {
    var error = event && event.detail && event.detail.error;
    if (!error) return "";
    return String(error.message || error) + " " + String(error.name || "");
  }

  function onError(event) {
    var text = errorText(event);
    if (window.console) console.warn("ChatKit error:", text);
    if (state === "loading" || FATAL.test(text)) {
      fallback("chatkit-error");
      return;
    }
    document.getElementById("chatkit-trouble").hidden = false;
  }

  function start() {
    if (state !== "loading") return;
    element.addEventListener("chatkit.error", onError);
    element.addEventListener("chatkit.ready", function () {
      if (state === "loading") setState("ready");
    });
    try {
      element.setOptions({
        api: {
          url: cfg.apiUrl,
          domainKey: cfg.domainKey,
          uploadStrategy: { type: "two_phase" },
        },
        history: { enabled: true },
        composer: {
          placeholder: "Message the demo (try: long, workflow, widget)",
          attachments: { enabled: true, maxCount: 5, maxSize: 10 * 1024 * 1024 },
        },
        threadItemActions: { retry: true },
        startScreen: {
          greeting: "flask-chatkit demo",
          prompts: [
            { label: "Say hello", prompt: "Hello!", icon: "sparkle" },
            { label: "A long answer", prompt: "Tell me something long", icon: "book-open" },
            { label: "A workflow", prompt: "Run a small workflow", icon: "bolt" },
            { label: "A widget", prompt: "Show me a widget", icon: "square-code" },
          ],
        },
      });
    } catch (err) {
      if (window.console) console.warn("ChatKit setOptions failed:", err);
      fallback("chatkit-error");
    }
  }

  setState("loading");
  window.chatkitDemo = { fallback: fallback };
  customElements.whenDefined("openai-chatkit").then(start);
  // One bound for the whole start-up: script download, definition, and "ready".
  setTimeout(function () {
    if (state === "loading") fallback("timeout");
  }, cfg.loadTimeoutMs);

  var script = document.createElement("script");
  script.src = cfg.scriptUrl;
  script.async = true;
  script.onerror = function () { fallback("script-error"); };
  document.head.appendChild(script);
})();
