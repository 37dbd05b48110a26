"""The built-in pipeline stages: decode, validate, enrich, transform, aggregate, route.

Theory of operation
-------------------
A stage is built once from its typed ``Options`` and a ``StageContext``, and then only sees
batches: ``process(batch)`` mutates the envelopes in place and returns the list for the next
stage (the same list, or a new one when it adds or removes envelopes: the input list is never
resized, so its owner can still account for every envelope it handed in). Everything that can
be decided at build time is: decoders, compiled schemas, conversion steps, rule tables.
Per message a stage does the least it can, and nothing at all when it has nothing to do (a
``validate`` with no schema for the device class costs one dict lookup). Counters are added
once per batch, never per message.

Options errors raise ``OptionError(field, message)`` (or ``ValueError``), which the pipeline
builder turns into a ``ConfigError`` naming ``pipelines[i].stages[j].<field>``.
"""

from __future__ import annotations

import math
import re
import time
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

import msgspec
from msgspec import Meta

from gateway.config import FieldSpec, Schema
from gateway.envelope import Envelope
from gateway.errors import ConfigError
from protocols.mqtt.topics import compile_topic_filter

if TYPE_CHECKING:
    from gateway.pipeline import StageContext, StageFactory

# Bound of the per-stage caches keyed by device or topic: cleared when full, so that a
# million devices cost a refill now and then, not unbounded memory.
CACHE_LIMIT = 65_536


class OptionError(ValueError):
    """A stage option is invalid; ``field`` is its path inside the stage's table."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class _Options(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


# ----------------------------------------------------------------------------------------
# decode


class DecodeOptions(_Options):
    pass


class DecodeStage:
    """JSON payload → ``env.data``. Invalid JSON is no error for the message: ``data`` stays
    ``None`` (the sinks keep the raw bytes, as base64), counted per tier."""

    Options: ClassVar[type[msgspec.Struct]] = DecodeOptions

    def __init__(self, options: DecodeOptions, context: StageContext) -> None:
        self._decode = msgspec.json.Decoder().decode
        self._errors = context.metrics.payload_errors

    def process(self, batch: list[Envelope]) -> list[Envelope]:
        decode = self._decode
        failed: list[Envelope] | None = None
        for env in batch:
            if env.data is None:
                try:
                    env.data = decode(env.payload)
                except (msgspec.DecodeError, UnicodeDecodeError):
                    if failed is None:
                        failed = []
                    failed.append(env)
        if failed is not None:
            tier = failed[0].tier
            if all(env.tier == tier for env in failed):
                self._errors.labels(tier).inc(len(failed))
            else:  # batches are of one tier; a caller that mixes them is still counted right
                for env in failed:
                    self._errors.labels(env.tier).inc()
        return batch


# ----------------------------------------------------------------------------------------
# validate

_MISSING: Any = object()

_TYPES: dict[str, tuple[type, ...]] = {
    "number": (int, float),
    "integer": (int,),
    "string": (str,),
    "boolean": (bool,),
    "object": (dict,),
    "array": (list,),
}
_JSON_NAMES: dict[type, str] = {int: "integer", float: "number", str: "string", bool: "boolean",
                                dict: "object", list: "array", type(None): "null"}

# (field, accepted types, type name, required, min, max)
_FieldCheck = tuple[str, tuple[type, ...], str, bool, float | None, float | None]


class _Checker:
    """One device class's schema, compiled."""

    __slots__ = ("allow_extra", "fields", "known", "quick")

    def __init__(self, device_class: str, schema: Schema) -> None:
        checks: list[_FieldCheck] = []
        for name, spec in schema.fields.items():
            _check_spec(f"schemas.{device_class}.fields.{name}", spec)
            checks.append((name, _TYPES[spec.type], spec.type, spec.required, spec.min,
                           spec.max))
        self.fields = tuple(checks)
        self.quick = tuple((name, types, required, lo, hi)
                           for name, types, _, required, lo, hi in checks)
        self.known = frozenset(schema.fields)
        self.allow_extra = schema.allow_extra

    def valid(self, data: dict[str, Any]) -> bool:
        """True if ``data`` certainly passes: the allocation-free common case. False means
        "ask ``check``" (a whole float passes as an integer there)."""
        for name, types, required, lo, hi in self.quick:
            value = data.get(name, _MISSING)
            if value is _MISSING:
                if required:
                    return False
                continue
            if (type(value) not in types or (lo is not None and value < lo)
                    or (hi is not None and value > hi)):
                return False
        return self.allow_extra or self.known.issuperset(data)

    def check(self, data: dict[str, Any]) -> tuple[list[str], list[str]]:
        """(findings, names of the offending fields present in ``data``)."""
        errors: list[str] = []
        bad: list[str] = []
        for name, types, type_name, required, lo, hi in self.fields:
            value = data.get(name, _MISSING)
            if value is _MISSING:
                if required:
                    errors.append(f"{name}: required")
                continue
            kind = type(value)
            if kind not in types and not (type_name == "integer" and kind is float
                                          and value.is_integer()):
                errors.append(f"{name}: expected {type_name}, "
                              f"got {_JSON_NAMES.get(kind, kind.__name__)}")
                bad.append(name)
                continue
            if lo is not None and value < lo:
                errors.append(f"{name}: {value!r} is below the minimum {lo:g}")
                bad.append(name)
            elif hi is not None and value > hi:
                errors.append(f"{name}: {value!r} is above the maximum {hi:g}")
                bad.append(name)
        if not self.allow_extra:
            known = self.known
            for name in data:
                if name not in known:
                    errors.append(f"{name}: unexpected field")
                    bad.append(name)
        return errors, bad


def _check_spec(where: str, spec: FieldSpec) -> None:
    if (spec.min is not None or spec.max is not None) and spec.type not in ("number",
                                                                            "integer"):
        raise ConfigError(f"{where}: min and max apply to number and integer fields only, "
                          f"not {spec.type}")
    if spec.min is not None and spec.max is not None and spec.min > spec.max:
        raise ConfigError(f"{where}: min {spec.min:g} is above max {spec.max:g}")


class ValidateOptions(_Options):
    on_invalid: Literal["mark", "drop_field"] = "mark"


class ValidateStage:
    """Checks dict data against ``schemas[env.device_class]``; findings go to ``env.errors``
    ("field: why") and ``iotgw_validation_failures_total{device_class}``. The message always
    continues; with ``on_invalid = "drop_field"`` the offending fields are removed from it."""

    Options: ClassVar[type[msgspec.Struct]] = ValidateOptions

    def __init__(self, options: ValidateOptions, context: StageContext) -> None:
        self._checkers = {cls: _Checker(cls, schema) for cls, schema in context.schemas.items()}
        self._drop = options.on_invalid == "drop_field"
        self._failures = context.metrics.validation_failures

    def process(self, batch: list[Envelope]) -> list[Envelope]:
        checkers = self._checkers
        if not checkers:
            return batch
        get = checkers.get
        failed: dict[str, int] | None = None
        for env in batch:
            checker = get(env.device_class)
            if checker is None:
                continue
            data = env.data
            if type(data) is not dict or checker.valid(data):
                continue
            errors, bad = checker.check(data)
            if errors:
                env.errors = errors if env.errors is None else env.errors + errors
                if self._drop:
                    for name in bad:
                        data.pop(name, None)
                if failed is None:
                    failed = {}
                failed[env.device_class] = failed.get(env.device_class, 0) + 1
        if failed is not None:
            for device_class, n in failed.items():
                self._failures.labels(device_class).inc(n)
        return batch


# ----------------------------------------------------------------------------------------
# enrich


class EnrichOptions(_Options):
    fields: list[str] | None = None
    """Copy only these attributes (default: all)."""


class EnrichStage:
    """Registry attributes → ``env.meta`` (only ``fields`` if given; meta set earlier wins on a
    clash); fills ``env.device_class`` and ``env.region`` when empty. Unknown devices pass."""

    Options: ClassVar[type[msgspec.Struct]] = EnrichOptions

    def __init__(self, options: EnrichOptions, context: StageContext) -> None:
        self._registry = context.registry
        self._fields = tuple(options.fields) if options.fields is not None else None
        # device → (attributes to copy, device_class, region), or None for unknown devices
        self._cache: dict[str, tuple[dict[str, str], str, str] | None] = {}

    def _resolve(self, device: str) -> tuple[dict[str, str], str, str] | None:
        record = self._registry.record(device)
        if record is None:
            entry = None
        else:
            attributes = self._registry.attributes(record)
            if self._fields is not None:
                attributes = {k: attributes[k] for k in self._fields if k in attributes}
            entry = (attributes, record.device_class, record.region)
        if len(self._cache) >= CACHE_LIMIT:
            self._cache.clear()
        self._cache[device] = entry
        return entry

    def process(self, batch: list[Envelope]) -> list[Envelope]:
        if not len(self._registry):
            return batch
        cache = self._cache
        resolve = self._resolve
        for env in batch:
            entry = cache.get(env.device, _MISSING)
            if entry is _MISSING:
                entry = resolve(env.device)
            if entry is None:
                continue
            attributes, device_class, region = entry
            if attributes:
                meta = env.meta
                env.meta = attributes.copy() if meta is None else {**attributes, **meta}
            if not env.device_class:
                env.device_class = device_class
            if not env.region:
                env.region = region
        return batch


# ----------------------------------------------------------------------------------------
# transform

_PSI_IN_KPA = 6.894757293168361
_MILE_IN_KM = 1.609344

# A conversion is a step: value → (value + before) * times / over + after. Constants are
# chosen so that each step rounds as the textbook formula does (9 / 5, not 1.8).
Step = tuple[float, float, float, float]

CONVERSIONS: dict[str, Step] = {
    "c_to_f": (0.0, 9.0, 5.0, 32.0),
    "f_to_c": (-32.0, 5.0, 9.0, 0.0),
    "k_to_c": (-273.15, 1.0, 1.0, 0.0),
    "c_to_k": (273.15, 1.0, 1.0, 0.0),
    "kpa_to_psi": (0.0, 1.0, _PSI_IN_KPA, 0.0),
    "psi_to_kpa": (0.0, _PSI_IN_KPA, 1.0, 0.0),
    "ms_to_s": (0.0, 1.0, 1000.0, 0.0),
    "s_to_ms": (0.0, 1000.0, 1.0, 0.0),
    "mph_to_kmh": (0.0, _MILE_IN_KM, 1.0, 0.0),
    "kmh_to_mph": (0.0, 1.0, _MILE_IN_KM, 0.0),
}


class Scale(_Options):
    factor: float = 1.0
    offset: float = 0.0


class TransformOptions(_Options):
    rename: dict[str, str] = {}
    convert: dict[str, str] = {}
    """field → one of ``CONVERSIONS`` (checked when the stage is built, naming the field)."""
    scale: dict[str, Scale] = {}
    round: dict[str, Annotated[int, Meta(ge=0, le=15)]] = {}
    drop: list[str] = []


class TransformStage:
    """Reshapes dict data, in this order: ``rename`` ({old = "new"}), ``convert`` ({field =
    "c_to_f" ...}), ``scale`` ({field = {factor, offset}}: v * factor + offset), ``round``
    ({field = digits}), ``drop`` ([fields]). Fields after ``rename`` go by their new names.
    Only top-level fields; values that are not numbers are left as they are."""

    Options: ClassVar[type[msgspec.Struct]] = TransformOptions

    def __init__(self, options: TransformOptions, context: StageContext) -> None:
        renamed = set(options.rename)
        for section in ("convert", "scale", "round"):
            for name in getattr(options, section):
                if name in renamed and name not in options.rename.values():
                    raise OptionError(f"{section}.{name}",
                                      f"{name!r} is renamed to {options.rename[name]!r} "
                                      "first; use the new name")
        steps: dict[str, list[Step]] = {}
        for name, conversion in options.convert.items():
            if conversion not in CONVERSIONS:
                raise OptionError(f"convert.{name}", f"unknown conversion {conversion!r} "
                                  f"(known: {', '.join(CONVERSIONS)})")
            steps.setdefault(name, []).append(CONVERSIONS[conversion])
        for name, scale in options.scale.items():
            steps.setdefault(name, []).append((0.0, scale.factor, 1.0, scale.offset))
        for name in options.round:
            steps.setdefault(name, [])
        self._renames = tuple(options.rename.items())
        # (field, steps, digits to round to or -1)
        self._numeric = tuple((name, tuple(field_steps), options.round.get(name, -1))
                              for name, field_steps in steps.items())
        self._drop = tuple(options.drop)
        self._noop = not (self._renames or self._numeric or self._drop)

    def process(self, batch: list[Envelope]) -> list[Envelope]:
        if self._noop:
            return batch
        renames, numeric, drop = self._renames, self._numeric, self._drop
        for env in batch:
            data = env.data
            if type(data) is not dict:
                continue
            for old, new in renames:
                if old in data:
                    data[new] = data.pop(old)
            for name, field_steps, digits in numeric:
                value = data.get(name)
                if type(value) is float or type(value) is int:
                    for before, times, over, after in field_steps:
                        value = (value + before) * times / over + after
                    data[name] = value if digits < 0 else round(value, digits)
            for name in drop:
                data.pop(name, None)
        return batch


# ----------------------------------------------------------------------------------------
# aggregate

# Per-device window state, a flat list (no per-field objects):
#   [window index, topic, tenant, tier, region, device_class, sinks, messages,
#    count_0, min_0, max_0, sum_0, count_1, ...]
_HEAD = 8


class AggregateOptions(_Options):
    fields: Annotated[list[str], Meta(min_length=1)]
    window_s: Annotated[float, Meta(gt=0)] = 60.0
    passthrough: bool = True

    def __post_init__(self) -> None:
        if len(set(self.fields)) != len(self.fields):
            raise ValueError("fields must be unique")


class AggregateStage:
    """Per-device tumbling windows of ``window_s`` seconds (aligned on the epoch, from
    ``received_at``) over the numeric ``fields``. A window closes when a message of a later
    window arrives for its device, or on ``flush(now)`` once ``now`` has passed its end; it
    is then emitted as a new envelope (topic ``<topic>/aggregate``, id
    ``<device>-agg-<window start>``, ``received_at`` = window start, data =
    ``{"window_start", "window_end", "messages", "fields": {field: {count, min, max, mean,
    sum}}}``), after the batch, to the following stages and the sinks. ``passthrough =
    false`` keeps the raw messages from going further. A late message (its window already
    closed) is counted in the device's open window."""

    Options: ClassVar[type[msgspec.Struct]] = AggregateOptions

    def __init__(self, options: AggregateOptions, context: StageContext) -> None:
        self._window = options.window_s
        self._fields = tuple(options.fields)
        self._passthrough = options.passthrough
        self._state: dict[str, list[Any]] = {}
        self._blank = [0, math.inf, -math.inf, 0] * len(self._fields)
        self._oldest = math.inf  # a lower bound of the open windows' indexes
        self._encode = msgspec.json.Encoder().encode
        self._whole = float(options.window_s).is_integer()

    def process(self, batch: list[Envelope]) -> list[Envelope]:
        state = self._state
        width = self._window
        fields = self._fields
        emitted: list[Envelope] = []
        for env in batch:
            data = env.data
            if type(data) is not dict:
                continue
            index = int(env.received_at // width)
            slots = state.get(env.device)
            if slots is None or index > slots[0]:
                if slots is not None:
                    emitted.append(self._emit(env.device, slots, env.received_ns,
                                              env.deadline_ns))
                slots = state[env.device] = [index, env.topic, env.tenant, env.tier,
                                             env.region, env.device_class, env.sinks, 0,
                                             *self._blank]
                if index < self._oldest:
                    self._oldest = index
            slots[7] += 1
            at = _HEAD
            for name in fields:
                value = data.get(name)
                if type(value) is float or type(value) is int:
                    slots[at] += 1
                    if value < slots[at + 1]:
                        slots[at + 1] = value
                    if value > slots[at + 2]:
                        slots[at + 2] = value
                    slots[at + 3] += value
                at += 4
        if self._passthrough:
            return batch + emitted if emitted else batch
        return emitted

    def flush(self, now: float) -> list[Envelope]:
        """Emit (and forget) every window that ended at or before wall-clock ``now``."""
        # Windows with an index below ``limit`` have ended (math.inf: all of them).
        limit = now // self._window if math.isfinite(now) else math.inf
        if not self._oldest < limit:
            return []
        emitted: list[Envelope] = []
        oldest = math.inf
        now_ns = time.monotonic_ns()
        for device, slots in list(self._state.items()):
            if slots[0] < limit:
                emitted.append(self._emit(device, slots, now_ns, 0))
                del self._state[device]
            elif slots[0] < oldest:
                oldest = slots[0]
        self._oldest = oldest
        return emitted

    def _emit(self, device: str, slots: list[Any], received_ns: int,
              deadline_ns: int) -> Envelope:
        index = slots[0]
        start = index * self._window
        stats: dict[str, dict[str, float]] = {}
        at = _HEAD
        for name in self._fields:
            count = slots[at]
            if count:
                total = slots[at + 3]
                stats[name] = {"count": count, "min": slots[at + 1], "max": slots[at + 2],
                               "mean": total / count, "sum": total}
            at += 4
        data = {"window_start": start, "window_end": start + self._window,
                "messages": slots[7], "fields": stats}
        label = str(int(start)) if self._whole else repr(start)
        return Envelope(
            id=f"{device}-agg-{label}", device=device, tenant=slots[2], tier=slots[3],
            region=slots[4], topic=f"{slots[1]}/aggregate", payload=self._encode(data),
            received_ns=received_ns, received_at=start, protocol="aggregate",
            device_class=slots[5], deadline_ns=deadline_ns, data=data, sinks=slots[6])


# ----------------------------------------------------------------------------------------
# route


class RouteMatch(_Options):
    """All given conditions must hold; ``topic`` is an MQTT topic filter, the rest exact."""

    tier: str | None = None
    topic: str | None = None
    device_class: str | None = None
    tenant: str | None = None
    region: str | None = None

    def __post_init__(self) -> None:
        if self.topic is not None:
            compile_topic_filter(self.topic)


class RouteRule(_Options):
    match: RouteMatch
    sinks: list[str]


# (tier, device_class, tenant, region, topic regex index or -1, sinks)
_CompiledRule = tuple[str | None, str | None, str | None, str | None, int, tuple[str, ...]]


class RouteOptions(_Options):
    sinks: list[str] = msgspec.field(default_factory=lambda: ["lake"])
    rules: list[RouteRule] = []


class RouteStage:
    """Sets ``env.sinks``: the first rule whose ``match`` holds gives its ``sinks``, else the
    default ``sinks``."""

    Options: ClassVar[type[msgspec.Struct]] = RouteOptions

    def __init__(self, options: RouteOptions, context: StageContext) -> None:
        known = context.sinks or {}
        tiers = context.config.tier_names

        def checked(place: str, names: list[str]) -> tuple[str, ...]:
            for name in names:
                if name not in known:
                    raise OptionError(place, f"unknown sink {name!r} "
                                             f"(known: {', '.join(sorted(known)) or 'none'})")
            return tuple(dict.fromkeys(names))

        self._default = checked("sinks", options.sinks)
        filters: list[re.Pattern[str]] = []
        rules: list[_CompiledRule] = []
        for i, rule in enumerate(options.rules):
            m = rule.match
            if m.tier is not None and m.tier not in tiers:
                raise OptionError(f"rules[{i}].match.tier",
                                  f"unknown tier {m.tier!r} (known: {', '.join(tiers)})")
            topic = -1
            if m.topic is not None:
                filters.append(compile_topic_filter(m.topic))
                topic = len(filters) - 1
            rules.append((m.tier, m.device_class, m.tenant, m.region, topic,
                          checked(f"rules[{i}].sinks", rule.sinks)))
        self._rules = tuple(rules)
        self._filters = tuple(filters)
        self._topics: dict[str, int] = {}  # topic → bit i set if it matches filter i

    def _topic_bits(self, topic: str) -> int:
        bits = 0
        for i, regex in enumerate(self._filters):
            if regex.match(topic):
                bits |= 1 << i
        if len(self._topics) >= CACHE_LIMIT:
            self._topics.clear()
        self._topics[topic] = bits
        return bits

    def process(self, batch: list[Envelope]) -> list[Envelope]:
        default = self._default
        rules = self._rules
        if not rules:
            for env in batch:
                env.sinks = default
            return batch
        topics = self._topics
        topic_bits = self._topic_bits
        use_topics = bool(self._filters)
        for env in batch:
            bits = 0
            if use_topics:
                bits = topics.get(env.topic, -1)
                if bits < 0:
                    bits = topic_bits(env.topic)
            chosen = default
            for tier, device_class, tenant, region, topic, sinks in rules:
                if ((tier is None or tier == env.tier)
                        and (device_class is None or device_class == env.device_class)
                        and (tenant is None or tenant == env.tenant)
                        and (region is None or region == env.region)
                        and (topic < 0 or bits >> topic & 1)):
                    chosen = sinks
                    break
            env.sinks = chosen
        return batch


BUILTIN_STAGES: dict[str, StageFactory] = {
    "decode": DecodeStage,
    "validate": ValidateStage,
    "enrich": EnrichStage,
    "transform": TransformStage,
    "aggregate": AggregateStage,
    "route": RouteStage,
}
"""Name → stage factory (the class: ``Options`` and a constructor taking (options, context))."""

__all__ = ["BUILTIN_STAGES", "CONVERSIONS", "AggregateStage", "DecodeStage", "EnrichStage",
           "OptionError", "RouteStage", "TransformStage", "ValidateStage"]
