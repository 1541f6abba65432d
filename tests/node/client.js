// A `ws` client driven over a control socket, so one Node process serves a whole
// test module. Each control connection carries one JSON command line and gets
// one JSON result line back:
//
//   {"url": U, "protocols": [...], "send": [M, ...], "wait_close": bool}
//
// M is {"text": S} or {"binary": N} (N bytes, byte i = i % 251). The client
// connects; if the server refuses the upgrade, the result holds its status,
// headers and body as the client read them. Otherwise it sends each message,
// waits for its answer (text as a string, binary as {binary: length, pattern:
// whether the bytes are the pattern}), then either closes with 1000 or (wait_close) waits for the
// server to close. Prints {"port": N} once listening.
"use strict";
const net = require("node:net");
const WebSocket = require("ws");

function pattern(n) {
  const buf = Buffer.alloc(n);
  for (let i = 0; i < n; i++) buf[i] = i % 251;
  return buf;
}

function run(cmd, done) {
  const result = { opened: false, received: [] };
  const ws = new WebSocket(cmd.url, cmd.protocols || [], { handshakeTimeout: 10000 });
  let finished = false;
  const finish = (extra) => {
    if (finished) return;
    finished = true;
    done(Object.assign(result, extra));
  };
  ws.on("unexpected-response", (req, res) => {
    let body = "";
    res.setEncoding("latin1");
    res.on("data", (chunk) => (body += chunk));
    res.on("end", () => {
      finish({ status: res.statusCode, headers: res.headers, body });
      req.destroy();
    });
    res.on("error", (err) => finish({ status: res.statusCode, body, error: err.code || String(err) }));
  });
  ws.on("error", (err) => finish({ error: err.code || err.message }));
  const queue = (cmd.send || []).map((m) => ("text" in m ? m.text : pattern(m.binary)));
  const next = () => {
    if (queue.length) {
      ws.send(queue[0]);
    } else if (!cmd.wait_close) {
      ws.close(1000, "done");
    }
  };
  ws.on("open", () => {
    result.opened = true;
    result.protocol = ws.protocol;
    next();
  });
  ws.on("message", (data, isBinary) => {
    // Every message sent is answered by one (an echo, or whoami's report).
    result.received.push(
      isBinary ? { binary: data.length, pattern: data.equals(pattern(data.length)) } : data.toString(),
    );
    queue.shift();
    next();
  });
  ws.on("close", (code, reason) => finish({ close_code: code, close_reason: reason.toString() }));
}

const control = net.createServer((conn) => {
  let line = "";
  conn.on("error", () => {});
  conn.setEncoding("utf8");
  conn.on("data", (chunk) => {
    line += chunk;
    const end = line.indexOf("\n");
    if (end < 0) return;
    run(JSON.parse(line.slice(0, end)), (result) => conn.end(JSON.stringify(result) + "\n"));
  });
});

control.listen(0, "127.0.0.1", () => {
  process.stdout.write(JSON.stringify({ port: control.address().port }) + "\n");
});
