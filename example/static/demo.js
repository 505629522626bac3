// Hosts OpenAI's ChatKit web component; falls back to flask-chatkit's console when
// the CDN script cannot load (offline, blocked) or never defines <openai-chatkit>.
(function () {
  "use strict";
  var cfg = JSON.parse(document.getElementById("chatkit-config").textContent);
  var element = document.getElementById("chatkit");
  var settled = false;

  function fallback(reason) {
    if (settled) return;
    settled = true;
    element.remove();
    var box = document.getElementById("fallback");
    var frame = document.getElementById("console-frame");
    box.hidden = false;
    box.dataset.reason = reason;
    frame.src = frame.dataset.src;
    document.body.dataset.chatkit = "fallback";
  }

  function start() {
    if (settled) return;
    settled = true;
    document.body.dataset.chatkit = "ready";
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
    element.addEventListener("chatkit.error", function () {
      document.getElementById("chatkit-trouble").hidden = false;
    });
  }

  window.chatkitDemo = { fallback: fallback };
  customElements.whenDefined("openai-chatkit").then(start);
  setTimeout(function () {
    if (!customElements.get("openai-chatkit")) fallback("timeout");
  }, cfg.loadTimeoutMs);

  var script = document.createElement("script");
  script.src = cfg.scriptUrl;
  script.async = true;
  script.onerror = function () { fallback("script-error"); };
  document.head.appendChild(script);
})();
