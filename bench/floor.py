"""The floor: the least a Python proxy on this stack adds to an OpenAI chat completion.

`python -m bench.floor --port 0 --upstream URL` prints `PORT <n>` and serves `POST /` with a bare
ASGI app under uvicorn (httptools, uvloop, as the service runs): it reads the body, posts it
upstream as a stream on one aiohttp session (the service's transport for chat requests), reads
the events, and answers the whole `chat.completion`. No routing, validation, auth, storage or
accounting: what is left is the HTTP in and out that any proxy written with these libraries
pays. The `v1` scenario measures it beside the service's `/v1`, so that a target in milliseconds
can be read against what the machine allows.
"""

from __future__ import annotations

import argparse
import socket
from typing import Any

import aiohttp
import orjson
import uvicorn

Scope = dict[str, Any]


def app_for(upstream: str) -> Any:
    sessions: list[aiohttp.ClientSession] = []  # made on the server's loop, at the first request
    headers = {"content-type": "application/json", "authorization": "Bearer floor"}

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b""
        more = True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        request = orjson.loads(body)
        request["model"] = request["model"].split("/", 1)[-1]
        request["stream"] = True
        parts: list[str] = []
        content = orjson.dumps(request)
        url = upstream + "/v1/chat/completions"
        if not sessions:
            sessions.append(aiohttp.ClientSession())
        async with sessions[0].post(url, data=content, headers=headers) as response:
            async for line in response.content:
                if line.startswith(b"data: {"):
                    for choice in orjson.loads(line[6:]).get("choices") or []:
                        if text := (choice.get("delta") or {}).get("content"):
                            parts.append(text)
        reply = {
            "id": "chatcmpl-floor",
            "object": "chat.completion",
            "model": request["model"],
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "".join(parts)},
                    "finish_reason": "stop",
                }
            ],
        }
        out = orjson.dumps(reply)
        start = [(b"content-type", b"application/json"), (b"content-length", str(len(out)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": start})
        await send({"type": "http.response.body", "body": out})

    return app


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.floor")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--upstream", required=True)
    args = parser.parse_args()
    sock = socket.socket()
    sock.bind(("127.0.0.1", args.port))
    sock.listen(2048)  # before the port is printed: a client may connect at once
    print(f"PORT {sock.getsockname()[1]}", flush=True)
    config = uvicorn.Config(
        app_for(args.upstream), http="httptools", loop="uvloop", log_level="warning", lifespan="off"
    )
    uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    main()
