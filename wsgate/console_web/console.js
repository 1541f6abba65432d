// wsgate web console: lists the gateway's APIs (admin API) and tests one from this
// browser over a WebSocket straight to the gateway. No build step, no dependencies.
// The admin token lives in this script's memory only (never in storage or the URL).
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);

  // The page is served at <admin>/console/; the admin API is one level up.
  const adminBase = new URL("../", window.location.href);

  let token = "";
  let apis = [];
  let current = null; // the picked API (a table from GET /apis)
  let socket = null;
  let opened = false; // the current socket got past its handshake
  let closing = false; // Disconnect was pressed
  let paramCount = 0;

  // --- output ------------------------------------------------------------------

  function clock() {
    const now = new Date();
    const pad = (n, w = 2) => String(n).padStart(w, "0");
    return `${pad(now.getHours())}:${pad(now.getMinutes())}:${pad(now.getSeconds())}.${pad(now.getMilliseconds(), 3)}`;
  }

  const ARROWS = { sent: "\u2192 sent", received: "\u2190 received", info: "\u2022 info", error: "! error" };

  // One Output entry: time, direction, kind (text, binary, status...), detail.
  function log(direction, kind, detail) {
    const item = document.createElement("li");
    item.className = direction;
    const parts = [
      ["time", clock()],
      ["dir", ARROWS[direction]],
      ["kind", kind],
      ["data", detail],
    ];
    for (const [cls, text] of parts) {
      const span = document.createElement(cls === "time" ? "time" : "span");
      span.className = cls;
      span.textContent = text;
      item.append(span, " ");
    }
    const output = $("output");
    output.append(item);
    output.scrollTop = output.scrollHeight;
  }

  function setStatus(state, text) {
    const status = $("status");
    status.dataset.state = state;
    status.textContent = text;
  }

  function hex(bytes) {
    return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  }

  function describeBinary(buffer) {
    const bytes = new Uint8Array(buffer);
    const shown = hex(bytes.subarray(0, 256));
    const more = bytes.length > 256 ? ` \u2026 (${bytes.length - 256} more)` : "";
    return `${bytes.length} bytes: ${shown}${more}`;
  }

  // --- admin API -----------------------------------------------------------------

  async function adminFetch(path, options = {}) {
    const headers = { Authorization: `Bearer ${token}`, Accept: "application/json" };
    if (options.body !== undefined) headers["Content-Type"] = "application/json";
    const response = await fetch(new URL(path, adminBase), {
      ...options,
      headers,
      cache: "no-store",
      credentials: "omit",
    });
    let data = null;
    try {
      data = await response.json();
    } catch {
      data = null;
    }
    if (!response.ok) {
      const errors = (data && data.errors) || [];
      const message = errors.map((e) => (e.field ? `${e.field}: ${e.message}` : e.message)).join("; ");
      const error = new Error(`HTTP ${response.status}${message ? `: ${message}` : ""}`);
      error.status = response.status;
      throw error;
    }
    return data;
  }

  // A wildcard listen address is no address a browser can connect to: use the
  // host this page came from, with the gateway's port.
  function publicGatewayUrl(url) {
    const parsed = new URL(url);
    if (["0.0.0.0", "[::]", "::"].includes(parsed.hostname)) {
      parsed.hostname = window.location.hostname;
    }
    return parsed.origin.replace(/^http/, "ws");
  }

  async function loadApis(event) {
    event.preventDefault();
    token = $("token").value.trim();
    $("auth-status").textContent = "Loading\u2026";
    try {
      const [list, gateway] = await Promise.all([
        adminFetch("apis"),
        adminFetch("console/api/gateway").catch((error) => ({ error })),
      ]);
      apis = list.apis || [];
      renderApis();
      let note = `${apis.length} API${apis.length === 1 ? "" : "s"} loaded.`;
      if (gateway.error) {
        note += ` The gateway URL is unknown (${gateway.error.message}): type it in.`;
      } else if (!$("gateway-url").value) {
        $("gateway-url").value = publicGatewayUrl(gateway.url);
      }
      $("auth-status").textContent = note;
      updateRequestUrl();
    } catch (error) {
      const hint = error.status === 401 ? " Check the admin token." : "";
      $("auth-status").textContent = `Cannot load the APIs: ${error.message}.${hint}`;
    }
  }

  function renderApis() {
    const rows = $("api-rows");
    rows.replaceChildren();
    if (apis.length === 0) {
      const row = rows.insertRow();
      const cell = row.insertCell();
      cell.colSpan = 4;
      cell.className = "note";
      cell.textContent = "This gateway has no APIs.";
      return;
    }
    apis.forEach((api, index) => {
      const row = rows.insertRow();
      const id = `pick-${index}`;
      const radio = document.createElement("input");
      radio.type = "radio";
      radio.name = "api";
      radio.id = id;
      radio.value = api.name;
      radio.dataset.api = api.name;
      radio.addEventListener("change", () => pick(api));
      row.insertCell().append(radio);
      const label = document.createElement("label");
      label.htmlFor = id;
      label.textContent = api.display_name || api.name;
      row.insertCell().append(label);
      const suffix = document.createElement("code");
      suffix.textContent = `/${api.path}`;
      row.insertCell().append(suffix);
      row.insertCell().textContent = api.subscription_required ? "required" : "optional";
    });
  }

  function pick(api) {
    current = api;
    $("api-name").textContent = `\u2014 ${api.display_name || api.name}`;
    $("params").replaceChildren();
    // An API that needs a subscription key gets a row for it, to fill in.
    if (api.subscription_required) {
      addParam(api.subscription_key_query || "subscription-key", "");
    }
    updateControls();
    updateRequestUrl();
  }

  // --- query parameters ------------------------------------------------------------

  function addParam(name = "", value = "") {
    const n = ++paramCount;
    const row = document.createElement("div");
    row.className = "param row";
    const field = (kind, text, initial) => {
      const label = document.createElement("label");
      label.htmlFor = `param-${kind}-${n}`;
      label.textContent = text;
      const input = document.createElement("input");
      input.type = "text";
      input.id = `param-${kind}-${n}`;
      input.className = `param-${kind}`;
      input.spellcheck = false;
      input.autocomplete = "off";
      input.value = initial;
      input.addEventListener("input", updateRequestUrl);
      row.append(label, input);
      return input;
    };
    const nameInput = field("name", "Name", name);
    field("value", "Value", value);
    const remove = document.createElement("button");
    remove.type = "button";
    remove.textContent = "Remove";
    remove.setAttribute("aria-label", `Remove parameter ${n}`);
    remove.addEventListener("click", () => {
      row.remove();
      updateRequestUrl();
    });
    row.append(remove);
    $("params").append(row);
    updateRequestUrl();
    return nameInput;
  }

  function requestUrl() {
    if (!current) return "";
    const base = $("gateway-url").value.trim().replace(/\/+$/, "");
    if (!base) return "";
    const query = new URLSearchParams();
    for (const row of $("params").querySelectorAll(".param")) {
      const name = row.querySelector(".param-name").value.trim();
      if (name) query.append(name, row.querySelector(".param-value").value);
    }
    const search = query.toString();
    return `${base}/${current.path}${search ? `?${search}` : ""}`;
  }

  function updateRequestUrl() {
    $("request-url").textContent = requestUrl() || "(pick an API)";
  }

  // --- the connection ------------------------------------------------------------

  function updateControls() {
    const live = socket !== null;
    $("connect").disabled = live || !current;
    $("disconnect").disabled = !live;
    $("send").disabled = !(live && opened);
  }

  function connect() {
    const url = requestUrl();
    let parsed;
    try {
      parsed = new URL(url);
    } catch {
      log("error", "url", `Not a valid URL: ${url || "(empty gateway URL)"}`);
      return;
    }
    if (parsed.protocol !== "ws:" && parsed.protocol !== "wss:") {
      log("error", "url", `The gateway URL must start with ws:// or wss://, got ${parsed.protocol}//`);
      return;
    }
    const protocols = $("subprotocols").value.split(",").map((p) => p.trim()).filter(Boolean);
    opened = false;
    closing = false;
    setStatus("connecting", "Connecting\u2026");
    log("info", "connect", `Connecting to ${url}${protocols.length ? ` (subprotocols: ${protocols.join(", ")})` : ""}`);
    try {
      socket = new WebSocket(url, protocols);
    } catch (error) {
      socket = null;
      setStatus("failed", "Failed");
      log("error", "connect", error.message);
      updateControls();
      return;
    }
    socket.binaryType = "arraybuffer";
    const ws = socket;
    ws.addEventListener("open", () => {
      opened = true;
      const sub = ws.protocol || "(none)";
      setStatus("connected", `Connected (subprotocol: ${sub})`);
      log("info", "open", `Connected: HTTP 101 Switching Protocols, subprotocol: ${sub}`);
      updateControls();
    });
    ws.addEventListener("message", (event) => {
      if (typeof event.data === "string") log("received", "text", event.data);
      else log("received", "binary", describeBinary(event.data));
    });
    ws.addEventListener("close", (event) => closed(ws, event, url));
    updateControls();
  }

  function closed(ws, event, url) {
    if (ws !== socket) return;
    socket = null;
    const reason = event.reason ? ` "${event.reason}"` : "";
    if (!opened) {
      // Browsers hide the HTTP status of a failed handshake: all a page sees is 1006.
      setStatus("failed", `Handshake failed (close code ${event.code})`);
      log("error", "close", `The handshake failed: close code ${event.code}. The browser does not show why; asking the admin listener\u2026`);
      probe(url);
    } else if (closing) {
      setStatus("disconnected", `Disconnected (close code ${event.code}${reason})`);
      log("info", "close", `Disconnected: close code ${event.code}${reason}`);
    } else {
      setStatus("closed", `Closed by the server (close code ${event.code}${reason})`);
      log("received", "close", `Closed by the other side: close code ${event.code}${reason}`);
    }
    updateControls();
  }

  // Replays the refused handshake from the admin listener, which can read the
  // gateway's HTTP answer (its status and JSON message).
  async function probe(url) {
    const parsed = new URL(url);
    const protocols = $("subprotocols").value.split(",").map((p) => p.trim()).filter(Boolean);
    const terminal = `wsgate console '${url}'`;
    try {
      const result = await adminFetch("console/api/probe", {
        method: "POST",
        body: JSON.stringify({ target: parsed.pathname + parsed.search, subprotocols: protocols }),
      });
      if (result.error) {
        log("error", "handshake", `The admin listener cannot reach the gateway either: ${result.error}`);
      } else if (result.status === 101) {
        log("info", "handshake", "The gateway accepts this handshake from the admin listener: " +
          "the browser's was refused for something only it sends (its Origin, its address) " +
          "or the network between them (TLS, proxy). Try: " + terminal);
      } else {
        const status = `HTTP ${result.status} ${result.reason || ""}`.trim();
        setStatus("refused", `Handshake refused: ${status}`);
        log("error", "handshake", `Refused by the gateway: ${status}${result.body ? ` ${result.body}` : ""}`);
        log("info", "hint", "A browser cannot add headers to a WebSocket handshake; " +
          `to send some, use the terminal console: ${terminal} -H 'Name: value'`);
      }
    } catch (error) {
      log("info", "handshake", `Could not ask the admin listener (${error.message}). See the status and message with the terminal console: ${terminal}`);
    }
  }

  function disconnect() {
    if (!socket) return;
    closing = true;
    setStatus("closing", "Disconnecting\u2026");
    log("sent", "close", "1000");
    socket.close(1000);
  }

  function parseHex(text) {
    const digits = text.replace(/\s+/g, "").replace(/^0x/i, "");
    if (!/^([0-9a-fA-F]{2})*$/.test(digits)) return null;
    const bytes = new Uint8Array(digits.length / 2);
    for (let i = 0; i < bytes.length; i++) bytes[i] = parseInt(digits.substr(i * 2, 2), 16);
    return bytes;
  }

  function send(event) {
    event.preventDefault();
    if (!socket || !opened) return;
    const payload = $("payload").value;
    if (document.querySelector('input[name="format"]:checked').value === "hex") {
      const bytes = parseHex(payload);
      if (bytes === null) {
        log("error", "binary", "The payload is not hex (two digits per byte, spaces allowed).");
        return;
      }
      socket.send(bytes);
      log("sent", "binary", describeBinary(bytes.buffer));
    } else {
      socket.send(payload);
      log("sent", "text", payload);
    }
  }

  // --- wiring --------------------------------------------------------------------

  document.addEventListener("DOMContentLoaded", () => {
    $("auth-form").addEventListener("submit", loadApis);
    $("add-param").addEventListener("click", () => addParam().focus());
    $("gateway-url").addEventListener("input", updateRequestUrl);
    $("connect").addEventListener("click", connect);
    $("disconnect").addEventListener("click", disconnect);
    $("send-form").addEventListener("submit", send);
    $("clear").addEventListener("click", () => $("output").replaceChildren());
    updateRequestUrl();
  });
})();
