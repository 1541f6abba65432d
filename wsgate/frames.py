"""A sans-io WebSocket frame scanner for the byte-for-byte relay, and close-frame helpers.

The relay never re-frames or unmasks data: it reads big chunks from one peer and
writes them to the other unchanged. :class:`FrameScanner` only reads the frame
headers in each chunk, enforces the RFC 6455 framing rules the gateway is
responsible for, and says how many leading bytes of the chunk may be forwarded.
Payloads are skipped by arithmetic; the only payload ever copied and unmasked is
a close frame's (at most 125 bytes), because its code and reason are logged.

Stopping points are exact: after a protocol error the forwarded bytes end where
the offending frame starts, and after a close frame they end where it ends, so
the relay can append its own close frame to a stream that is still well formed.
The one exception is a frame whose first bytes already went out with an earlier
chunk (a header or close payload split across reads); :attr:`FrameScanner.at_boundary`
is then False, and the relay must not append anything to that stream.
"""

from __future__ import annotations

import os

from wsgate.errors import MessageTooBig, ProtocolError

__all__ = [
    "FrameScanner",
    "MessageTooBig",
    "ProtocolError",
    "build_close_frame",
    "parse_close_payload",
]

_OPCODE_NAMES = {0: "continuation", 1: "text", 2: "binary", 8: "close", 9: "ping", 10: "pong"}

# The longest header: 2 fixed bytes, 8 bytes of extended length, 4 of mask key.
_MAX_HEADER = 14
_MAX_CONTROL_PAYLOAD = 125


# Every frame's first byte maps to one of these classes; _BAD covers whatever is
# wrong regardless of stream state (reserved opcode, RSV bits not allowed here, a
# control frame without FIN). The scanner also counts frames per class.
_BAD = 0
_TEXT_FIN = 1
_BINARY_FIN = 2
_TEXT_MORE = 3
_BINARY_MORE = 4
_CONT_FIN = 5
_CONT_MORE = 6
_PING = 7
_PONG = 8
_CLOSE = 9
_NUM_CLASSES = 10


def _classify(b0: int, allow_rsv: bool) -> int:
    opcode = b0 & 0x0F
    fin = b0 & 0x80
    if b0 & 0x70 and not (allow_rsv and opcode in (1, 2)):
        return _BAD
    if opcode == 1:
        return _TEXT_FIN if fin else _TEXT_MORE
    if opcode == 2:
        return _BINARY_FIN if fin else _BINARY_MORE
    if opcode == 0:
        return _CONT_FIN if fin else _CONT_MORE
    if not fin:
        return _BAD
    return {8: _CLOSE, 9: _PING, 10: _PONG}.get(opcode, _BAD)


# One table lookup replaces the opcode/FIN/RSV checks on the hot path.
_CLASSES = bytes(_classify(b, False) for b in range(256))
_CLASSES_RSV = bytes(_classify(b, True) for b in range(256))


def _close_code_allowed(code: int) -> bool:
    return 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999


def xor_mask(payload: bytes | bytearray | memoryview, key: bytes) -> bytes:
    """``payload`` XOR the 4-byte mask ``key`` repeated (masking and unmasking alike).

    The relay never unmasks data payloads; this serves close payloads and test peers.
    """
    n = len(payload)
    if not n:
        return b""
    stream = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(stream, "little")).to_bytes(
        n, "little"
    )


def parse_close_payload(payload: bytes) -> tuple[int | None, str]:
    """Validate and decode an (already unmasked) close frame payload.

    Returns ``(code, reason)``; an empty payload gives ``(None, "")``.

    Raises :class:`ProtocolError` for a 1-byte payload, a code that may not be
    sent on the wire (allowed: 1000-1003, 1007-1014, 3000-4999), or a reason
    that is not valid UTF-8.
    """
    if not payload:
        return None, ""
    if len(payload) == 1:
        raise ProtocolError("close frame payload is 1 byte long; a status code needs 2")
    code = int.from_bytes(payload[:2], "big")
    if not _close_code_allowed(code):
        raise ProtocolError(f"close frame carries status code {code}, not allowed on the wire")
    try:
        reason = payload[2:].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"close frame reason is not valid UTF-8: {exc.reason}") from None
    return code, reason


def build_close_frame(code: int | None, reason: str = "", *, mask: bool) -> bytes:
    """A well-formed close frame with ``code`` and ``reason``.

    ``mask=True`` is for frames the gateway sends to a backend (it acts as the
    client there) and uses a fresh random mask key; ``mask=False`` is for frames
    sent to a client. ``code=None`` gives an empty payload (no reason allowed).
    The reason is cut, on a UTF-8 character boundary, so the payload fits in
    125 bytes (characters UTF-8 cannot encode, i.e. lone surrogates, become "?").

    Raises :class:`ValueError` for a code that may not go on the wire (such as
    1005 or 1006) or for a reason without a code.
    """
    if code is None:
        if reason:
            raise ValueError("a close frame without a status code cannot carry a reason")
        payload = b""
    else:
        if not _close_code_allowed(code):
            raise ValueError(f"close code {code} may not be sent on the wire")
        # A lone surrogate must not make the gateway's own close fail.
        encoded = reason.encode("utf-8", "replace")
        limit = _MAX_CONTROL_PAYLOAD - 2
        if len(encoded) > limit:
            # The source was valid UTF-8, so "ignore" can only drop the one
            # character the cut went through.
            encoded = encoded[:limit].decode("utf-8", "ignore").encode("utf-8")
        payload = code.to_bytes(2, "big") + encoded
    if mask:
        key = os.urandom(4)
        return bytes((0x88, 0x80 | len(payload))) + key + xor_mask(payload, key)
    return bytes((0x88, len(payload))) + payload


def _header_length(prefix: bytes) -> int | None:
    """The full header length implied by a header prefix, or None before byte 2."""
    if len(prefix) < 2:
        return None
    b1 = prefix[1]
    code = b1 & 0x7F
    ext = 2 if code == 126 else 8 if code == 127 else 0
    return 2 + ext + (4 if b1 & 0x80 else 0)


class FrameScanner:
    """Sans-io scanner of one direction of a WebSocket stream.

    Feed it every chunk read from a peer, in order; forward only the prefix of
    each chunk that :meth:`feed` accepts. It checks headers, never payloads
    (except close payloads), and allocates nothing per data frame.

    ``from_client`` selects the masking rule (client frames must be masked,
    backend frames must not). ``max_message_size`` > 0 caps the total payload
    of one data message. ``allow_rsv`` permits RSV bits on the first frame of a
    data message, for a negotiated extension such as permessage-deflate.
    """

    __slots__ = (
        "_classes",
        "_close_buf",
        "_close_key",
        "_close_need",
        "_counts",
        "_fragmenting",
        "_header",
        "_mask_bit",
        "_message_size",
        "_remaining",
        "_stop_boundary",
        "allow_rsv",
        "close",
        "close_code",
        "close_reason",
        "close_received",
        "error",
        "from_client",
        "max_message_size",
        "stopped",
    )

    def __init__(
        self, *, from_client: bool, max_message_size: int = 0, allow_rsv: bool = False
    ) -> None:
        if max_message_size < 0:
            raise ValueError("max_message_size must be >= 0 (0 means unlimited)")
        self.from_client = from_client
        self.max_message_size = max_message_size
        self.allow_rsv = allow_rsv
        #: The protocol error that stopped the stream; MessageTooBig for an oversize message.
        self.error: ProtocolError | None = None
        #: A complete, valid close frame was scanned; nothing after it is accepted.
        self.close_received = False
        #: The status code of that close frame; None if its payload was empty.
        self.close_code: int | None = None
        #: The decoded reason of that close frame ('' if none).
        self.close_reason = ""
        #: Close frames scanned (0 or 1: the stream stops after one).
        self.close = 0
        self._classes = _CLASSES_RSV if allow_rsv else _CLASSES
        # Frames scanned per first-byte class; the public counters are sums of these.
        self._counts = [0] * _NUM_CLASSES
        self._mask_bit = 0x80 if from_client else 0
        self._fragmenting = False
        self._message_size = 0
        # Payload bytes of the current data frame still to come.
        self._remaining = 0
        # Leading bytes of a header that was cut by the end of a chunk.
        self._header = b""  # a header cut by the end of a chunk (b"": a shared empty object)
        # A close frame whose payload was cut by the end of a chunk.
        self._close_buf: bytearray | None = None
        self._close_key: bytes | None = None
        self._close_need = 0
        #: The stream stopped: :attr:`error` is set or :attr:`close_received` is True.
        #: (One attribute, read by the relay per chunk, instead of two.)
        self.stopped = False
        self._stop_boundary = True

    @property
    def messages(self) -> int:
        """Data messages whose final frame header has been scanned."""
        c = self._counts
        return c[_TEXT_FIN] + c[_BINARY_FIN] + c[_CONT_FIN]

    @property
    def text(self) -> int:
        """Text messages started (their first frame's header has been scanned)."""
        return self._counts[_TEXT_FIN] + self._counts[_TEXT_MORE]

    @property
    def binary(self) -> int:
        """Binary messages started (their first frame's header has been scanned)."""
        return self._counts[_BINARY_FIN] + self._counts[_BINARY_MORE]

    @property
    def ping(self) -> int:
        """Ping frames whose header has been scanned."""
        return self._counts[_PING]

    @property
    def pong(self) -> int:
        """Pong frames whose header has been scanned."""
        return self._counts[_PONG]

    @property
    def at_boundary(self) -> bool:
        """True when the bytes accepted so far end exactly at a frame boundary.

        False while a cut header is buffered or payload of the current frame is
        still expected. A fragmented message in progress is still at a boundary,
        as control frames may be sent between its fragments. After a stop it
        tells whether the accepted bytes end cleanly (so the relay may append
        its own close frame): False only when the offending frame had already
        begun in an earlier chunk.
        """
        if self.stopped:
            return self._stop_boundary
        return not self._remaining and not self._header and self._close_buf is None

    def feed(self, data: bytes | bytearray | memoryview) -> int:
        """Scan the next chunk of the stream; return how many leading bytes may be forwarded.

        Normally that is ``len(data)``. It is less when the stream must stop:

        * a protocol error was found (:attr:`error` is set): the count ends at
          the start of the offending frame, or is 0 if that frame began in an
          earlier chunk (then :attr:`at_boundary` is False);
        * a close frame was completed (:attr:`close_received` is True): the
          count ends exactly at the end of the close frame; nothing after it is
          forwarded.

        After either, every further call returns 0. Never raises.
        """
        if self.stopped:
            return 0
        if isinstance(data, memoryview) and (data.format != "B" or data.ndim != 1):
            data = data.cast("B") if data.c_contiguous else memoryview(data.tobytes())
        n = len(data)
        pos = 0
        if self._header:
            pos = self._finish_header(data, n)
            if self.stopped or pos >= n:
                return pos
        remaining = self._remaining
        if remaining:
            if remaining >= n - pos:
                self._remaining = remaining - (n - pos)
                return n
            self._remaining = 0
            pos += remaining
        elif self._close_buf is not None:
            return self._continue_close(data, pos, n)
        return self._scan(data, pos, n)

    def _scan(self, buf: bytes | bytearray | memoryview, pos: int, n: int) -> int:
        """Scan whole frames from ``buf[pos:n]``, which starts at a frame boundary."""
        # Everything the loop touches is a local, and each check is as cheap as
        # it can be: this loop is the relay's per-frame cost. Any failure only
        # breaks out; _frame_error() then says what was wrong.
        classes = self._classes
        counts = self._counts
        mask_bit = self._mask_bit
        key_len = 4 if mask_bit else 0
        limit = self.max_message_size
        fragmenting = self._fragmenting
        size = self._message_size
        bad = closing = False
        header_end = length = 0
        last = n - 1
        while pos < last:
            b0 = buf[pos]
            cls = classes[b0]
            # A wrong mask bit pushes the length code past 127.
            length = buf[pos + 1] ^ mask_bit
            if length < 126:
                header_end = pos + 2 + key_len
                if header_end > n:
                    break
            elif length == 126:
                header_end = pos + 4 + key_len
                if header_end > n:
                    break
                length = buf[pos + 2] << 8 | buf[pos + 3]
            elif length == 127:
                header_end = pos + 10 + key_len
                if header_end > n:
                    break
                length = int.from_bytes(buf[pos + 2 : pos + 10], "big")
                if length >> 63:
                    bad = True
                    break
            else:
                bad = True
                break
            if cls <= _BINARY_MORE:
                if fragmenting or cls == _BAD:
                    bad = True
                    break
                if limit:
                    if length > limit:
                        bad = True
                        break
                    size = length
                fragmenting = cls >= _TEXT_MORE
            elif cls <= _CONT_MORE:
                if not fragmenting:
                    bad = True
                    break
                if limit:
                    if size + length > limit:
                        bad = True
                        break
                    size += length
                fragmenting = cls == _CONT_MORE
            elif length > _MAX_CONTROL_PAYLOAD or header_end - pos != 2 + key_len:
                # The 7-bit length field itself must say <= 125 (RFC 6455 5.5): a
                # 126/127 code is refused whatever the extended length, as it is
                # when the header arrives cut (_frame_error) and by wsproto.
                bad = True
                break
            elif cls == _CLOSE:
                if length == 1:
                    bad = True
                else:
                    closing = True
                break
            counts[cls] += 1
            pos = header_end + length
        self._fragmenting = fragmenting
        self._message_size = size
        if bad:
            return self._fail(buf, pos)
        if closing:
            return self._start_close(buf, pos, header_end, length, n)
        if pos > n:
            self._remaining = pos - n
        elif pos < n:
            tail = bytes(buf[pos:n])
            err = self._frame_error(tail)
            if err is not None:
                self._stop(err, boundary=True)
                return pos
            self._header = tail
        return n

    def _finish_header(self, data: bytes | bytearray | memoryview, n: int) -> int:
        """Complete a header cut by the previous chunk; return the offset reached in ``data``."""
        have = len(self._header)
        probe = bytes(self._header) + bytes(data[: _MAX_HEADER - have])
        need = _header_length(probe)
        if need is None or len(probe) < need:
            err = self._frame_error(probe)
            if err is not None:
                self._stop(err, boundary=False)
                return 0
            self._header += bytes(data)
            return n
        self._header = b""
        end = self._scan(probe, 0, need)
        if self.error is not None:
            self._stop_boundary = False
            return 0
        return end - have

    def _start_close(
        self,
        buf: bytes | bytearray | memoryview,
        start: int,
        header_end: int,
        length: int,
        n: int,
    ) -> int:
        key = bytes(buf[header_end - 4 : header_end]) if self._mask_bit else None
        end = header_end + length
        if end <= n:
            return self._finish_close(bytes(buf[header_end:end]), key, end, start, boundary=True)
        self._close_buf = bytearray(buf[header_end:n])
        self._close_key = key
        self._close_need = end - n
        return n

    def _continue_close(self, data: bytes | bytearray | memoryview, pos: int, n: int) -> int:
        assert self._close_buf is not None
        need = self._close_need
        take = min(need, n - pos)
        self._close_buf += data[pos : pos + take]
        if take < need:
            self._close_need = need - take
            return n
        payload = bytes(self._close_buf)
        self._close_buf = None
        return self._finish_close(payload, self._close_key, pos + take, 0, boundary=False)

    def _finish_close(
        self, payload: bytes, key: bytes | None, end: int, start: int, *, boundary: bool
    ) -> int:
        """Validate a complete close payload; accept through ``end`` or stop at ``start``."""
        if key is not None:
            payload = xor_mask(payload, key)
        try:
            code, reason = parse_close_payload(payload)
        except ProtocolError as exc:
            self._stop(exc, boundary=boundary)
            return start
        self.close += 1
        self.close_received = True
        self.close_code = code
        self.close_reason = reason
        self._stop(None, boundary=True)
        return end

    def _fail(self, buf: bytes | bytearray | memoryview, pos: int) -> int:
        err = self._frame_error(bytes(buf[pos : pos + _MAX_HEADER]))
        self._stop(err or ProtocolError("invalid frame header"), boundary=True)
        return pos

    def _stop(self, err: ProtocolError | None, *, boundary: bool) -> None:
        self.error = err
        self.stopped = True
        self._stop_boundary = boundary
        self._header = b""
        self._close_buf = None
        self._remaining = 0

    def _frame_error(self, header: bytes) -> ProtocolError | None:
        """The first rule a (possibly partial) frame header breaks, in the current state.

        The hot path only detects that *something* is wrong; the wording lives here.
        """
        b0 = header[0]
        opcode = b0 & 0x0F
        name = _OPCODE_NAMES.get(opcode)
        if name is None:
            return ProtocolError(f"frame uses reserved opcode {opcode:#x}")
        if b0 & 0x70:
            bits = ", ".join(f"RSV{i}" for i, bit in ((1, 0x40), (2, 0x20), (3, 0x10)) if b0 & bit)
            if not self.allow_rsv:
                return ProtocolError(f"{name} frame has {bits} set but no extension was negotiated")
            if opcode not in (1, 2):
                return ProtocolError(
                    f"{name} frame has {bits} set; an extension may only set them on the "
                    "first frame of a data message"
                )
        if opcode >= 8 and not b0 & 0x80:
            return ProtocolError(
                f"{name} frame is fragmented (FIN not set); control frames can't be"
            )
        if opcode == 0 and not self._fragmenting:
            return ProtocolError("continuation frame without a fragmented message in progress")
        if opcode in (1, 2) and self._fragmenting:
            return ProtocolError(
                f"new {name} message started before the fragmented message in progress finished"
            )
        if len(header) < 2:
            return None
        b1 = header[1]
        if b1 & 0x80 and not self.from_client:
            return ProtocolError(f"{name} frame from the backend is masked; it must not be")
        if not b1 & 0x80 and self.from_client:
            return ProtocolError(f"{name} frame from the client is not masked; it must be")
        code = b1 & 0x7F
        if opcode >= 8 and code > _MAX_CONTROL_PAYLOAD:
            return ProtocolError(f"{name} frame payload is longer than 125 bytes")
        if opcode == 8 and code == 1:
            return ProtocolError("close frame payload is 1 byte long; a status code needs 2")
        if code == 127 and len(header) >= 3 and header[2] & 0x80:
            return ProtocolError("frame length is 64 bits with the most significant bit set")
        length: int | None = code
        if code == 126:
            length = int.from_bytes(header[2:4], "big") if len(header) >= 4 else None
        elif code == 127:
            length = int.from_bytes(header[2:10], "big") if len(header) >= 10 else None
        limit = self.max_message_size
        if length is not None and opcode < 8 and limit:
            total = length + (self._message_size if opcode == 0 else 0)
            if total > limit:
                return MessageTooBig(
                    f"{name} frame takes the message to {total} bytes, over the "
                    f"max_message_size of {limit}"
                )
        return None
