// A WebSocket backend written the way Node services commonly are: an http server,
// `ws` in noServer mode, and an 'upgrade' handler that refuses some requests by
// writing a response with socket.end(). Like most such handlers it adds no 'error'
// listener to the socket: a TCP reset from the gateway after the refusal raises an
// unhandled ECONNRESET and the process dies (what tests/test_interop_node.py checks).
//
// Paths: /reject -> 403 through socket.end; /reject-keepalive -> 401 with
// Content-Length and the socket left open (the peer decides when it ends);
// anything else -> an echo server that answers "close:CODE:REASON" by closing.
// Prints {"port": N} once listening, then nothing (stdout is a pipe nobody reads).
"use strict";
const http = require("node:http");
const { WebSocketServer } = require("ws");

const wss = new WebSocketServer({
  noServer: true,
  handleProtocols: (protocols) => (protocols.has("chat.v2") ? "chat.v2" : false),
});

wss.on("connection", (ws, req) => {
  ws.on("message", (data, isBinary) => {
    const text = isBinary ? null : data.toString();
    if (text !== null && text.startsWith("close:")) {
      const [, code, reason] = text.split(":");
      ws.close(Number(code), reason);
    } else if (text === "whoami") {
      ws.send(JSON.stringify({ path: req.url, protocol: ws.protocol }));
    } else {
      ws.send(data, { binary: isBinary });
    }
  });
});

const server = http.createServer((req, res) => {
  res.writeHead(426, { "Content-Type": "text/plain" }).end("WebSocket only\n");
});

server.on("upgrade", (req, socket, head) => {
  if (req.url.startsWith("/reject-keepalive")) {
    const body = "token required\n";
    socket.write(
      "HTTP/1.1 401 Unauthorized\r\nContent-Type: text/plain\r\n" +
        `Content-Length: ${body.length}\r\n\r\n${body}`,
    );
    return;
  }
  if (req.url.startsWith("/reject")) {
    const body = "forbidden by the node backend\n";
    socket.end(
      "HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain\r\nConnection: close\r\n" +
        `Content-Length: ${body.length}\r\n\r\n${body}`,
    );
    return;
  }
  wss.handleUpgrade(req, socket, head, (ws) => wss.emit("connection", ws, req));
});

server.listen(0, "127.0.0.1", () => {
  process.stdout.write(JSON.stringify({ port: server.address().port }) + "\n");
});
