"""The checked-in fuzzing corpus: seeds, and what the fuzzer found worth keeping.

``python -m tests.fuzz.make_corpus`` writes the seeds: valid streams and
requests for both targets (the fuzzer mutates its way to invalid ones), named
by the SHA-1 of their content as libFuzzer names its inputs, so rerunning it
changes nothing.

``python -m tests.fuzz.make_corpus --keep KIND DIR...`` adds to
``corpus/KIND`` the inputs from DIR (e.g. ``.fuzz/frames`` after ``make fuzz``)
that reach code paths (line-to-line arcs in wsgate, h11 and wsproto) no
corpus input reaches yet, smallest first. (libFuzzer's own ``-merge=1`` does
not see Python coverage in its merge subprocesses.)
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from types import FrameType
from typing import Any
from unittest import mock

from wsproto.frame_protocol import FrameProtocol

from tests.fuzz.targets import check_frames, check_handshake, frames_input, handshake_input

CORPUS = Path(__file__).resolve().parent / "corpus"


def frame_seeds() -> list[bytes]:
    seeds = []
    for from_client in (True, False):

        def proto(client: bool = from_client) -> FrameProtocol:
            return FrameProtocol(client=client, extensions=[])

        p = proto()
        streams = [
            p.send_data("hello"),
            p.send_data(b"\x00\x01\x02" * 50),  # 150 bytes: 16-bit length
            p.send_data(b"x" * 70000),  # 64-bit length
            p.send_data("frag", fin=False) + p.ping(b"p") + p.send_data("ment", fin=True),
            p.send_data(b"a", fin=False)
            + p.send_data(b"b", fin=False)
            + p.send_data(b"", fin=True),
            p.ping(b"") + p.pong(b"x" * 125),
            p.send_data("") + p.close(1000, "bye"),
            p.close(4999, "é" * 20),
            p.close(),
            proto().send_data("after") + proto().close(1001) + proto().ping(b"late"),
        ]
        for i, stream in enumerate(streams):
            cuts = bytes([(i * 37) % 256, (i * 91) % 256]) if i % 2 else b""
            seeds.append(frames_input(stream, from_client=from_client, cuts=cuts))
        seeds.append(frames_input(streams[1], from_client=from_client, limit=125))
        seeds.append(frames_input(streams[3], from_client=from_client, limit=1000))
    # An extension's compressed frame: RSV1 on a message's first frame.
    seeds.append(frames_input(b"\xc1\x85\x00\x00\x00\x00hello", from_client=True, allow_rsv=True))
    return seeds


GOOD = (
    b"GET /echo/room?x=1 HTTP/1.1\r\nHost: gateway.test\r\nUpgrade: websocket\r\n"
    b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Version: 13\r\n"
)


def handshake_seeds() -> list[bytes]:
    requests = [
        GOOD + b"\r\n",
        GOOD + b"Sec-WebSocket-Protocol: chat, superchat\r\n"
        b"Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n\r\n",
        GOOD + b"Cookie: a=b\r\nAuthorization: Bearer abc.def.ghi\r\n"
        b"X-Forwarded-For: 10.0.0.1\r\nConnection: keep-alive, X-Drop\r\nX-Drop: 1\r\n\r\n",
        GOOD.replace(b"?x=1", b"?subscription-key=k&access_token=t&sig=s&room=1") + b"\r\n",
        GOOD + b"X-Folded: a\r\n b\r\n\r\n",
        GOOD + b"X-Name: Jos\xc3\xa9\r\n\r\n",
        GOOD + b"\r\n\x81\x85\x00\x00\x00\x00early",  # a frame right behind the request
        b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n",  # plain HTTP
        b"GET / HTTP/1.0\r\n\r\n",
        GOOD,  # unfinished
        b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi",
        GOOD.replace(b"/echo/room?x=1", b"/chat/v1/a/../b?%41=%ZZ") + b"\r\n",
    ]
    seeds = []
    for i, request in enumerate(requests):
        seeds.append(handshake_input(request))
        seeds.append(
            handshake_input(request, cuts=bytes([40 + i, 120, 200]), secure=bool(i % 2), eof=True)
        )
    return seeds


def write_seeds() -> None:
    # wsproto masks client frames with os.urandom(4): fix the keys, so that the
    # seeds (named by content) are the same on every run.
    with mock.patch("wsproto.frame_protocol.os.urandom", lambda n: b"\x5a\xa5\x0f\xf0"[:n]):
        frames = frame_seeds()
    for kind, seeds in (("frames", frames), ("handshake", handshake_seeds())):
        directory = CORPUS / kind
        directory.mkdir(parents=True, exist_ok=True)
        for seed in seeds:
            (directory / hashlib.sha1(seed).hexdigest()).write_bytes(seed)
        print(f"{directory}: {len(seeds)} seeds")


CHECKS: dict[str, Callable[[bytes], None]] = {"frames": check_frames, "handshake": check_handshake}
_TRACED = ("/wsgate/", "/h11/", "/wsproto/")


def arcs(check: Callable[[bytes], None], data: bytes) -> set[tuple[str, int, int]]:
    """The (file, line, next line) arcs ``check(data)`` runs in the traced packages."""
    seen: set[tuple[str, int, int]] = set()
    last: dict[Any, int] = {}

    def tracer(frame: FrameType, event: str, _arg: Any) -> Any:
        name = frame.f_code.co_filename
        if not any(part in name for part in _TRACED):
            return None
        if event == "line":
            seen.add((name, last.get(frame, -1), frame.f_lineno))
            last[frame] = frame.f_lineno
        return tracer

    sys.settrace(tracer)
    try:
        check(data)
    except Exception:
        pass  # a crash input is kept as a regression, not here
    finally:
        sys.settrace(None)
    return seen


def keep(kind: str, sources: Iterable[Path]) -> None:
    check = CHECKS[kind]
    directory = CORPUS / kind
    covered: set[tuple[str, int, int]] = set()
    for path in directory.iterdir():
        covered |= arcs(check, path.read_bytes())
    candidates = sorted(
        (p for source in sources for p in source.iterdir() if p.is_file()),
        key=lambda p: p.stat().st_size,
    )
    kept = 0
    for path in candidates:
        data = path.read_bytes()
        new = arcs(check, data) - covered
        if new:
            covered |= new
            (directory / hashlib.sha1(data).hexdigest()).write_bytes(data)
            kept += 1
    print(f"{directory}: kept {kept} of {len(candidates)} inputs")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", nargs="+", metavar=("KIND", "DIR"), help="KIND DIR...")
    args = parser.parse_args()
    if args.keep:
        keep(args.keep[0], [Path(d) for d in args.keep[1:]])
    else:
        write_seeds()


if __name__ == "__main__":
    main()
