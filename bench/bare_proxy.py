"""The floor of the tap's stack: a bare aiohttp pass-through proxy (uvloop, one pooled ClientSession).

Reads the request body, forwards it with the client's headers (minus hop-by-hop ones) and streams the
answer back. No hooks, no accounting, no events: what aiohttp's server and client cost for this job.

    python bench/bare_proxy.py --upstream http://127.0.0.1:8090 --port 8081 [--workers 2]
"""

from __future__ import annotations

import argparse
import multiprocessing

import aiohttp
import uvloop
from aiohttp import web

HOP = frozenset({"connection", "keep-alive", "te", "trailer", "transfer-encoding", "upgrade", "host",
                 "content-length", "accept-encoding", "content-encoding"})


def build(upstream: str) -> web.Application:
    app = web.Application()

    async def on_startup(app: web.Application) -> None:
        app["session"] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1000), auto_decompress=True)

    async def on_cleanup(app: web.Application) -> None:
        await app["session"].close()

    async def proxy(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP}
        async with app["session"].request(request.method, upstream + request.match_info["rest"], headers=headers,
                                          data=body or None, allow_redirects=False) as up:
            resp = web.StreamResponse(status=up.status,
                                      headers={k: v for k, v in up.headers.items() if k.lower() not in HOP})
            await resp.prepare(request)
            async for chunk in up.content.iter_any():
                await resp.write(chunk)
            await resp.write_eof()
            return resp

    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    app.router.add_route("*", "/{rest:.*}", proxy)
    return app


def serve(upstream: str, port: int, reuse_port: bool) -> None:
    uvloop.install()
    web.run_app(build(upstream.rstrip("/") + "/"), host="127.0.0.1", port=port, reuse_port=reuse_port,
                access_log=None, print=None)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    workers = [multiprocessing.Process(target=serve, args=(args.upstream, args.port, True))
               for _ in range(args.workers - 1)]
    for worker in workers:
        worker.start()
    serve(args.upstream, args.port, args.workers > 1)
