"""The fake upstream for the benchmark, run as its own process: `python -m bench.upstream --port 0`.

It is `tests.fake_upstream.FakeUpstream` (unchanged) with one addition: the reply is chosen by the
request. The last user message may carry `chunks=N` (a reply of N deltas of 4 characters each,
`000 `, `001 `, ...: consecutive deltas differ, as LiteLLM refuses a stream that repeats one) and
`delay=S` (seconds between deltas) and `md` (the reply is Markdown of about 4N characters, from
`bench.conversations.markdown_of`, in N deltas). Without them the fake's default echo reply
is used (`You said: ...`, one delta per word). Prints `PORT <n>` on stdout once it listens.
"""

from __future__ import annotations

import argparse
import contextvars
import random
import re
import signal
import sys
import threading
from typing import Any

from bench.conversations import markdown_of
from tests.fake_upstream import FakeUpstream, Reply, _last_user_text

CHUNKS_RE = re.compile(r"\bchunks=(\d+)")
DELAY_RE = re.compile(r"\bdelay=([0-9.]+)")
MARKDOWN_RE = re.compile(r"\bmd\b")

_reply: contextvars.ContextVar[Reply | None] = contextvars.ContextVar("bench_reply", default=None)


def reply_for(body: dict[str, Any]) -> Reply | None:
    """The Reply a request asks for in its last user message, or None for the default echo."""
    text = _last_user_text(body.get("messages"))
    chunks = CHUNKS_RE.search(text)
    delay = DELAY_RE.search(text)
    if chunks is None and delay is None:
        return None
    n = int(chunks.group(1)) if chunks else 50
    if MARKDOWN_RE.search(text):
        text = markdown_of(4 * n, random.Random(n))
    else:
        text = "".join(f"{i % 1000:03d} " for i in range(n))
    return Reply(text=text, chunks=n, chunk_delay=float(delay.group(1)) if delay else 0.0)


class BenchUpstream(FakeUpstream):
    """FakeUpstream whose reply comes from the request (each connection is its own task, hence its
    own context: the context variable set here is what `_next_reply` sees for this request)."""

    def _next_reply(self) -> Reply:
        chosen = _reply.get()
        return chosen if chosen is not None else super()._next_reply()

    async def _openai_chat(self, conn: Any, body: dict[str, Any], keep_alive: bool) -> bool:
        _reply.set(reply_for(body))
        self.requests.clear()  # the benchmark never reads them: keep memory flat
        return await super()._openai_chat(conn, body, keep_alive)

    async def _anthropic_messages(self, conn: Any, body: dict[str, Any], keep_alive: bool) -> bool:
        _reply.set(reply_for(body))
        self.requests.clear()
        return await super()._anthropic_messages(conn, body, keep_alive)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.upstream")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    upstream = BenchUpstream(args.host, args.port).start()
    print(f"PORT {upstream._bound_port}", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        while not stop.wait(0.5):
            pass
    finally:
        upstream.stop()
    sys.exit(0)


if __name__ == "__main__":
    main()
