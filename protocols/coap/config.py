"""``[coap]``: the CoAP listener (UDP), its resources, topics, limits and device keys.

Kept apart from ``protocols.coap.server`` so that ``gateway.config`` can import it without
importing aiocoap or the gateway's ingest (which imports ``gateway.config``).
"""

from __future__ import annotations

import re
from typing import Annotated

from msgspec import Meta, Struct

DEVICE_PLACEHOLDER = "{device}"
_DEVICE_PATTERN = r"^[A-Za-z0-9_.:~@-]{1,128}$"
DEVICE_NAME = re.compile(_DEVICE_PATTERN.removesuffix("$") + r"\Z")
"""A device as it appears in a resource path (``/t/<device>``): URI-unreserved characters,
``:`` and ``@`` (so URNs fit), and never an MQTT wildcard or level separator."""

DeviceName = Annotated[str, Meta(pattern=_DEVICE_PATTERN)]
DeviceKey = Annotated[str, Meta(min_length=8, max_length=256)]


class CoapSection(Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """Devices POST/PUT readings to ``/<telemetry_resource>/<device>`` and GET/Observe
    ``/<commands_resource>/<device>``."""

    enabled: bool = True
    listen: str = "0.0.0.0:5683"
    """UDP address (``HOST:PORT``, ``[v6]:PORT``; port 0: any free port)."""
    telemetry_resource: str = "t"
    """Path of the ingest resources, before the device (segments separated by ``/``)."""
    commands_resource: str = "c"
    """Path of the command resources, before the device."""
    telemetry_topic: str = "coap/{device}"
    """Topic a device's readings are classified, routed and stored under."""
    commands_topic: str = "commands/{device}"
    """Topic whose messages a device reads (GET: the retained one) and observes."""
    max_payload: Annotated[int, Meta(ge=64, le=16 * 1024 * 1024)] = 64 * 1024
    """Largest request payload, block-wise uploads included (more: 4.13)."""
    psk: dict[DeviceName, DeviceKey] = {}
    """Pre-shared keys: device → key. A device listed here must send its key as the URI
    query ``k=<key>`` with every request (missing or wrong: 4.01)."""
    require_psk: bool = False
    """Refuse devices that have no key in ``psk`` (4.03); otherwise they need none."""
    overload_max_age_s: Annotated[int, Meta(ge=0, le=3600)] = 5
    """Max-Age of a 5.03 answer: when a refused device should try again."""
    max_observations: Annotated[int, Meta(ge=0)] = 100_000
    """Observations of command resources held at once; more are served as plain GETs."""

    def __post_init__(self) -> None:
        from gateway.config import split_host_port  # here: gateway.config imports this module

        split_host_port(self.listen)
        resources = {}
        for name in ("telemetry_resource", "commands_resource"):
            path = getattr(self, name)
            if not path or any(not s for s in path.strip("/").split("/")) or "?" in path:
                raise ValueError(f"{name}: expected path segments like \"t\" or \"api/t\", "
                                 f"got {path!r}")
            resources[name] = tuple(path.strip("/").split("/"))
        if resources["telemetry_resource"] == resources["commands_resource"]:
            raise ValueError("telemetry_resource and commands_resource must differ")
        for name in ("telemetry_topic", "commands_topic"):
            check_topic_template(name, getattr(self, name))

    @property
    def telemetry_path(self) -> tuple[str, ...]:
        return tuple(self.telemetry_resource.strip("/").split("/"))

    @property
    def commands_path(self) -> tuple[str, ...]:
        return tuple(self.commands_resource.strip("/").split("/"))


def check_topic_template(name: str, template: str) -> None:
    """A topic with exactly one ``{device}`` and otherwise a valid MQTT topic name."""
    if template.count(DEVICE_PLACEHOLDER) != 1:
        raise ValueError(f"{name}: must contain {DEVICE_PLACEHOLDER} once, got {template!r}")
    rest = template.replace(DEVICE_PLACEHOLDER, "")
    if "{" in rest or "}" in rest:
        raise ValueError(f"{name}: only {DEVICE_PLACEHOLDER} may be substituted, got "
                         f"{template!r}")
    if "+" in rest or "#" in rest or "\0" in rest or template.startswith("$"):
        raise ValueError(f"{name}: not a valid topic name (no wildcards, no leading $): "
                         f"{template!r}")
