"""Configuration: TOML decoded into msgspec Structs.

Unknown keys are rejected and every error names its place, e.g.
``tiers[2].max_latency_ms: expected >= 1``. Loading never reads the environment and never
logs; the CLI decides what to do with a ``ConfigError``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct

from gateway.auth import AuthSection
from gateway.errors import ConfigError
from gateway.fleet.config import FleetSection
from gateway.fleet.config import check_tiers as check_fleet_tiers
from policies.anomaly import AnomalySection
from policies.maintenance import MaintenanceSection
from policies.regions import RegionsSection, check_regions
from policies.scaling import ScalingSection, check_scaling
from protocols.amqp.config import AmqpSection
from protocols.amqp.config import check_tiers as check_amqp_tiers
from protocols.coap.config import CoapSection
from protocols.mqtt.topics import compile_topic_filter

# The dispatcher lanes ahead of every tier, for messages triage found anomalous: one per
# severity, most severe first, so that anomalies are served in severity order.
ANOMALY_LANES = {severity: f"anomaly-{severity}"
                 for severity in ("emergency", "critical", "warning", "info")}

PositiveInt = Annotated[int, Meta(ge=1)]
NonNegInt = Annotated[int, Meta(ge=0)]
Share = Annotated[float, Meta(ge=0.0, le=1.0)]
Name = Annotated[str, Meta(pattern=r"^[A-Za-z0-9_.-]+$", min_length=1, max_length=64)]


class _Base(Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    pass


def split_host_port(value: str, default_host: str = "0.0.0.0") -> tuple[str, int]:
    """``"HOST:PORT"``, ``":PORT"`` or ``"[v6]:PORT"`` → (host, port)."""
    m = re.fullmatch(r"(?:\[(?P<v6>[^\]]+)\]|(?P<host>[^:]*)):(?P<port>\d{1,5})", value)
    if m is None or int(m["port"]) > 65535:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    host = m["v6"] or m["host"] or default_host
    return host, int(m["port"])


class GatewaySection(_Base, frozen=True):
    node_id: Name = "gw-1"
    region: Name = "local"
    state_dir: str = "./data/state"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"


class MQTTListener(_Base, frozen=True):
    listen: str = "0.0.0.0:1883"
    max_packet_size: Annotated[int, Meta(ge=64, le=268_435_455)] = 1_048_576
    receive_maximum: Annotated[int, Meta(ge=1, le=65535)] = 1024
    """MQTT 5 receive-maximum announced to clients (QoS>0 publishes in flight per client)."""
    max_keepalive: Annotated[int, Meta(ge=0, le=65535)] = 0
    """If > 0, MQTT 5 clients asking for more (or 0) are told to use this (server keepalive)."""
    connect_timeout_s: Annotated[float, Meta(gt=0)] = 10.0
    write_high_water: PositiveInt = 256 * 1024
    """Stop reading a client whose unsent acks exceed this many bytes."""
    topic_alias_maximum: Annotated[int, Meta(ge=0, le=65535)] = 64
    """MQTT 5 topic aliases a client may set per connection (0: none)."""
    max_topic_cache: PositiveInt = 1024
    """Per connection: topic → classification entries kept."""

    def __post_init__(self) -> None:
        split_host_port(self.listen)


class BrokerSection(_Base, frozen=True):
    """The MQTT broker: sessions and what they keep (gateway/broker.py)."""

    max_queued: PositiveInt = 1000
    """QoS 1/2 messages queued per session (offline, or over its receive maximum); more are
    dropped and counted in ``iotgw_mqtt_dropped_total{reason="queue_full"}``."""
    max_session_expiry_s: Annotated[int, Meta(ge=0, le=0xFFFFFFFF)] = 7 * 24 * 3600
    """Longest a session outlives its connection (MQTT 3.1.1 persistent sessions get this)."""
    queue_qos0: bool = False
    """Also queue QoS 0 messages for offline persistent sessions (Mosquitto's default: no)."""
    snapshot_interval_s: Annotated[float, Meta(gt=0)] = 5.0
    """How often changed sessions and retained messages are saved to the state dir."""
    max_subscriptions_per_client: PositiveInt = 1000
    """Subscriptions one session may hold; more are refused (SUBACK 0x97 quota exceeded,
    MQTT 3.1.1: 0x80) and counted in ``iotgw_mqtt_refused_subscriptions_total``."""
    max_retained: PositiveInt = 1_000_000
    """Retained messages kept in all; a retained message for a new topic past it is still
    delivered but not kept (``iotgw_mqtt_dropped_total{reason="retained_full"}``)."""


class AdminSection(_Base, frozen=True):
    listen: str = "127.0.0.1:9883"

    def __post_init__(self) -> None:
        split_host_port(self.listen)


class Tier(_Base, frozen=True):
    name: Name
    max_latency_ms: Annotated[float, Meta(gt=0)]
    guaranteed_share: Share = 0.0
    """Fraction of dispatches this tier gets whenever it has work waiting."""
    weight: Annotated[float, Meta(ge=0)] = 0.0
    """Claim on the spare capacity (what the guaranteed shares leave), divided by weight
    among the tiers with work waiting; with no weights it goes to the most urgent tier."""
    shed_qos0: bool = True
    """Excess work: QoS 0 messages of this tier may be shed when the gateway is past its
    limits (QoS >= 1 is never shed: it is pushed back or refused)."""
    late: Literal["process", "shed"] = "process"
    """Late work: ``shed`` drops QoS 0 messages still queued past ``max_latency_ms`` (counted
    in ``iotgw_messages_shed_total{reason="late"}``); QoS >= 1 is always processed."""


class DispatchSection(_Base, frozen=True):
    batch_size: Annotated[int, Meta(ge=1, le=65536)] = 512
    """Messages handed to one processing slot at a time."""
    slots: Annotated[int, Meta(ge=1, le=4096)] = 4
    """Batches in processing at once (they overlap only while sinks wait on I/O)."""
    shed_above: PositiveInt = 150_000
    """Above this many queued messages QoS 0 messages are shed, lowest tier first, more tiers
    as the backlog nears ``max_queued`` (never tiers with ``shed_qos0 = false``)."""
    max_queued: PositiveInt = 200_000
    """Above this many queued messages, reading from clients pauses (back-pressure)."""
    resume_queued: PositiveInt = 100_000
    """Reading resumes when the queue falls back below this."""
    routine_floor: Annotated[float, Meta(ge=0, le=1)] = 0.2
    """Fraction of dispatches routine tiers keep while anomalies alone exceed capacity; also
    the share of slots preemption leaves to routine work."""

    def __post_init__(self) -> None:
        if self.resume_queued >= self.max_queued:
            raise ValueError("resume_queued must be below max_queued")
        if self.shed_above > self.max_queued:
            raise ValueError("shed_above must not exceed max_queued")


class WALSection(_Base, frozen=True):
    """The write-ahead log of acknowledged messages (under ``gateway.state_dir``/wal)."""

    enabled: bool = True
    fsync: bool = True
    """fsync each group commit; off only for tests and benchmarks that measure without it."""
    segment_bytes: Annotated[int, Meta(ge=4096)] = 64 * 1024 * 1024
    commit_interval_ms: Annotated[float, Meta(ge=0, le=1000)] = 2.0
    """Longest a record waits for its group commit (the fsync batch window)."""
    max_unretired: PositiveInt = 1_000_000
    """Above this many unretired records, new QoS >= 1 work is refused (MQTT 5: 0x97)."""
    max_uncommitted: PositiveInt = 50_000
    """Above this many messages waiting for their group commit, reading from clients pauses
    until the disk catches up (back-pressure into TCP, not memory)."""


class AuditSection(_Base, frozen=True):
    enabled: bool = True
    dir: str = "./data/audit"
    max_file_bytes: Annotated[int, Meta(ge=4096)] = 16 * 1024 * 1024


class RetrySection(_Base, frozen=True):
    """What happens when a pipeline stage raises, or an isolated stage hangs or dies."""

    attempts: Annotated[int, Meta(ge=1, le=100)] = 5
    backoff_initial_ms: Annotated[float, Meta(ge=0)] = 100.0
    backoff_max_ms: Annotated[float, Meta(ge=0)] = 10_000.0
    stage_timeout_s: Annotated[float, Meta(gt=0)] = 5.0
    """Longest an isolated stage may run on one batch before it counts as failed."""
    dead_letter_dir: str = "./data/dead-letter"


class Match(_Base, frozen=True):
    """All given conditions must hold. Strings are shell globs; ``topic`` is an MQTT filter."""

    device: str | None = None
    username: str | None = None
    client_id: str | None = None
    topic: str | None = None
    tenant: str | None = None
    payload: dict[str, str | int | float | bool] | None = None
    """Top-level fields of the JSON payload and the values they must equal."""

    def __post_init__(self) -> None:
        if self.payload is not None and not self.payload:
            raise ValueError("payload: give at least one field, or leave it out")
        if self.topic is not None:
            compile_topic_filter(self.topic)  # raises ValueError naming what is wrong


class Rule(_Base, frozen=True):
    match: Match
    tenant: str | None = None
    tier: str | None = None
    device_class: str | None = None
    region: str | None = None


class ClassifySection(_Base, frozen=True):
    device_id: Literal["client_id", "topic"] = "client_id"
    """Where the device id comes from: the MQTT client id, or a topic level."""
    device_topic_level: NonNegInt = 1
    """With ``device_id = "topic"``: which level (0-based) of the topic names the device."""
    default_tenant: str = "default"
    default_tier: str = "standard"
    registry: str | None = None
    """A device registry file (TOML or CSV): device → tenant, tier, device_class, region."""
    rules: list[Rule] = []


class FieldSpec(_Base, frozen=True):
    type: Literal["number", "integer", "string", "boolean", "object", "array"] = "number"
    required: bool = False
    min: float | None = None
    max: float | None = None


class Schema(_Base, frozen=True):
    fields: dict[str, FieldSpec] = {}
    allow_extra: bool = True


class Pipeline(_Base, frozen=True):
    name: Name
    stages: list[dict[str, Any]]
    """Each stage is a table with ``type`` (a registered stage name) and its options."""
    tiers: list[str] | None = None
    """Tiers this pipeline serves; the first pipeline without ``tiers`` serves the rest."""


class Sink(_Base, frozen=True):
    type: str
    options: dict[str, Any] = {}


class Config(_Base, frozen=True):
    gateway: GatewaySection = GatewaySection()
    mqtt: MQTTListener = MQTTListener()
    coap: CoapSection = CoapSection()
    broker: BrokerSection = BrokerSection()
    auth: AuthSection = AuthSection()
    admin: AdminSection = AdminSection()
    dispatch: DispatchSection = DispatchSection()
    tiers: list[Tier] = []
    classify: ClassifySection = ClassifySection()
    schemas: dict[str, Schema] = {}
    pipelines: list[Pipeline] = []
    sinks: dict[str, Sink] = {}
    wal: WALSection = WALSection()
    audit: AuditSection = AuditSection()
    retry: RetrySection = RetrySection()
    anomaly: AnomalySection = AnomalySection()
    maintenance: MaintenanceSection = MaintenanceSection()
    scaling: ScalingSection = ScalingSection()
    amqp: AmqpSection = AmqpSection()
    fleet: FleetSection = FleetSection()
    regions: RegionsSection = RegionsSection()
    """Regional processing (``gateway.regions``); empty: off. Its RabbitMQ is ``fleet.url``."""

    def __post_init__(self) -> None:
        if not self.tiers:
            raise ValueError("at least one tier is required")
        names = [t.name for t in self.tiers]
        reserved = sorted(set(names) & set(ANOMALY_LANES.values()))
        if reserved:
            raise ValueError(f"tier names {reserved} are reserved for the anomaly lanes")
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"tier names must be unique, repeated: {sorted(dup)}")
        if sum(t.guaranteed_share for t in self.tiers) > 1.0 + 1e-9:
            raise ValueError("the tiers' guaranteed_share values add up to more than 1")
        if self.classify.default_tier not in names:
            raise ValueError(f"classify.default_tier {self.classify.default_tier!r} is not a tier")
        for i, rule in enumerate(self.classify.rules):
            if rule.tier is not None and rule.tier not in names:
                raise ValueError(f"classify.rules[{i}].tier: unknown tier {rule.tier!r}")
        for i, p in enumerate(self.pipelines):
            for t in p.tiers or ():
                if t not in names:
                    raise ValueError(f"pipelines[{i}].tiers: unknown tier {t!r}")
        check_amqp_tiers(self.amqp, names)
        check_scaling(self.scaling)
        check_fleet_tiers(self.fleet, names)
        check_regions(self.regions, self.gateway.region)

    @property
    def tier_names(self) -> list[str]:
        return [t.name for t in self.tiers]


_PATH_RE = re.compile(r" - at `\$(?P<path>[^`]*)`$")


def format_error(err: msgspec.MsgspecError) -> str:
    """msgspec's ``"Expected ... - at `$.tiers[2].x`"`` → ``"tiers[2].x: expected ..."``; a
    message that names its own field (``"share: ..."``) gets the path prefixed."""
    text = str(err)
    m = _PATH_RE.search(text)
    if m is None:
        return text
    path = m["path"].lstrip(".")
    message = text[: m.start()]
    if not path:
        return message
    if re.match(r"^[a-z_]+(\[\d+\])?[.:\[]", message):  # "share: ..." → "groups[1].share: ..."
        return f"{path}.{message}"
    return f"{path}: {message[:1].lower() + message[1:]}"


def parse_config(text: str | bytes, source: str = "<config>") -> Config:
    try:
        return msgspec.toml.decode(text, type=Config)
    except (msgspec.ValidationError, msgspec.DecodeError) as err:
        raise ConfigError(f"{source}: {format_error(err)}") from None


def load_config(path: str | Path | None = None) -> Config:
    """Load ``path``, or the built-in default config when ``path`` is None."""
    file = Path(path) if path is not None else default_config_path()
    try:
        text = file.read_bytes()
    except OSError as err:
        raise ConfigError(f"{file}: cannot read: {err.strerror}") from None
    return parse_config(text, str(file))


def default_config_path() -> Path:
    here = Path(__file__).resolve().parent
    packaged = here / "default_config" / "gateway.toml"  # inside the wheel
    return packaged if packaged.exists() else here.parent / "config" / "gateway.toml"
