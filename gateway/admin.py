"""The admin HTTP API (aiohttp): metrics, health, readiness, a JSON status, drain."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

if TYPE_CHECKING:
    from gateway.app import Gateway


def make_app(gateway: Gateway) -> web.Application:
    async def metrics(request: web.Request) -> web.Response:
        body = generate_latest(gateway.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response(gateway.health())

    async def readyz(request: web.Request) -> web.Response:
        ready = gateway.ready
        return web.json_response({"ready": ready}, status=200 if ready else 503)

    async def stats(request: web.Request) -> web.Response:
        return web.json_response(gateway.stats())

    async def drain(request: web.Request) -> web.Response:
        gateway.request_stop("admin drain")
        return web.json_response({"draining": True, "queued": gateway.dispatcher.queued},
                                 status=202)

    app = web.Application()
    app.router.add_post("/v1/drain", drain)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/v1/stats", stats)
    return app
