"""The admin HTTP API (aiohttp): metrics, health, readiness, a JSON status, drain,
anomaly acknowledgement, maintenance reservations, the scaling signal.

Errors are JSON objects ``{"error": "..."}`` with a 4xx status naming what was wrong."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, TypeVar

import msgspec
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from policies.maintenance import MaintenanceError, Reservation

if TYPE_CHECKING:
    from gateway.app import Gateway


T = TypeVar("T")


class Acknowledge(msgspec.Struct, forbid_unknown_fields=True):
    device: Annotated[str, msgspec.Meta(min_length=1)]
    detector: Annotated[str, msgspec.Meta(min_length=1)]


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


async def _body(request: web.Request, kind: type[T]) -> T | web.Response:
    try:
        return msgspec.json.decode(await request.read(), type=kind)
    except msgspec.ValidationError as err:
        return _error(400, f"invalid request: {err}")
    except msgspec.DecodeError as err:
        return _error(400, f"the body is not JSON: {err}")


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

    async def acknowledge(request: web.Request) -> web.Response:
        ack = await _body(request, Acknowledge)
        if isinstance(ack, web.Response):
            return ack
        if not gateway.acknowledge_anomaly(ack.device, ack.detector):
            return _error(404, f"no anomaly of detector {ack.detector!r} is raised for device "
                               f"{ack.device!r}")
        return web.json_response({"acknowledged": True})

    async def maintenance_list(request: web.Request) -> web.Response:
        return web.json_response({"reserved_slots": gateway.maintenance.planner.reserved_slots(),
                                  "reservations": gateway.maintenance.list()})

    async def maintenance_schedule(request: web.Request) -> web.Response:
        reservation = await _body(request, Reservation)
        if isinstance(reservation, web.Response):
            return reservation
        if any(r["name"] == reservation.name for r in gateway.maintenance.list()):
            return _error(409, f"a reservation named {reservation.name!r} already exists")
        try:
            gateway.maintenance.schedule(reservation)
        except MaintenanceError as err:
            return _error(400, str(err))
        listed = next(r for r in gateway.maintenance.list() if r["name"] == reservation.name)
        return web.json_response(listed, status=201)

    async def maintenance_cancel(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if not gateway.maintenance.cancel(name):
            return _error(404, f"no maintenance reservation named {name!r}")
        return web.json_response({"cancelled": name})

    app = web.Application()
    async def scaling(request: web.Request) -> web.Response:
        if gateway.elasticity is None:
            return _error(404, "scaling is disabled ([scaling] enabled = false)")
        return web.json_response(gateway.elasticity.report())

    app.router.add_get("/v1/scaling", scaling)
    app.router.add_get("/v1/maintenance", maintenance_list)
    app.router.add_post("/v1/maintenance", maintenance_schedule)
    app.router.add_delete("/v1/maintenance/{name}", maintenance_cancel)
    app.router.add_post("/v1/drain", drain)
    app.router.add_post("/v1/anomalies/ack", acknowledge)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/v1/stats", stats)
    return app
