"""Anomaly triage on the ingest path: detectors configured in TOML, per-device compact state.

Theory of operation
-------------------
``AnomalyDetector.check`` runs for every message before it is queued, so the common case
(no detector applies, or none fires) must be cheap:

* Detectors are grouped by device class once per class (``_by_class``); a message whose
  class has no detector costs that one dict lookup and returns ``None``.
* Detectors that need memory (rate, zscore, silence) keep it in ``array`` slabs indexed by
  a per-device integer slot. The device → slot dict is shared by all detectors, so a device
  costs one dict entry plus a few machine words per stateful detector (see
  ``policies/_anomaly_bench.py``). Stateless detectors (threshold, plugin) never allocate a
  slot.
* Nothing is allocated on the no-anomaly path beyond the floats Python arithmetic makes;
  the result list is created only when something fires.

Raised anomalies go through one gate, ``_raise``: a (device, detector) already raised
within ``suppress_s`` is counted in ``suppressed`` instead of raised again. The gate keeps
a small record per *raised* (device, detector) pair only; records whose condition cleared
are dropped once their suppression window is over (in ``escalations``). ``escalations(now)``
re-raises, one severity higher (up to ``emergency``), every record that is unacknowledged,
whose condition still holds, and that has not changed severity for ``escalate_after_s``.
A condition "holds" until the detector sees a normal reading for that device (for
``silence``: until the device speaks again).
"""

from __future__ import annotations

import importlib.metadata
import math
import re
from array import array
from collections.abc import Callable, Iterable, Mapping
from typing import Annotated, Any, Literal, Protocol, runtime_checkable

import msgspec
from msgspec import Meta, Struct

from policies.alerts import EscalationSection
from protocols.mqtt.topics import compile_topic_filter

Severity = Literal["info", "warning", "critical", "emergency"]
SEVERITIES: tuple[Severity, ...] = ("info", "warning", "critical", "emergency")
_SEVERITY_INDEX: dict[str, int] = {s: i for i, s in enumerate(SEVERITIES)}

ENTRY_POINT_GROUP = "iot_gateway.detectors"

PositiveFloat = Annotated[float, Meta(gt=0)]
NonNegFloat = Annotated[float, Meta(ge=0)]
DetectorName = Annotated[str, Meta(pattern=r"^[A-Za-z0-9_.-]+$", min_length=1, max_length=64)]

_ZSCORE_DEFAULTS = {"alpha": 0.1, "z": 3.0, "min_samples": 10}
_KIND_FIELDS: dict[str, frozenset[str]] = {
    "threshold": frozenset({"field", "above", "below"}),
    "rate": frozenset({"field", "max_rate_per_s"}),
    "zscore": frozenset({"field", "alpha", "z", "min_samples", "min_std"}),
    "silence": frozenset({"silent_s"}),
    "plugin": frozenset({"plugin", "field"}),
}
_KIND_SPECIFIC = frozenset().union(*_KIND_FIELDS.values())


# --------------------------------------------------------------------------- config


class Detector(Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """One anomaly definition (``[[anomaly.detectors]]``)."""

    name: DetectorName
    kind: Literal["threshold", "rate", "zscore", "silence", "plugin"]
    severity: Severity = "warning"
    field: str | None = None
    """Top-level payload field read by threshold, rate and zscore (and passed to plugins)."""
    above: float | None = None
    below: float | None = None
    max_rate_per_s: PositiveFloat | None = None
    """Largest allowed |Δvalue| / Δt between two consecutive readings of a device."""
    alpha: Annotated[float, Meta(gt=0, lt=1)] | None = None
    """EWMA smoothing factor of the per-device baseline (default 0.1)."""
    z: PositiveFloat | None = None
    """Raise when |value - mean| / std exceeds this (default 3)."""
    min_samples: Annotated[int, Meta(ge=1)] | None = None
    """Readings folded into the baseline before any z-score is judged (default 10)."""
    min_std: NonNegFloat | None = None
    """Floor of the standard deviation, so a flat baseline does not flag every wobble."""
    silent_s: PositiveFloat | None = None
    plugin: str | None = None
    """Name of a ``CustomDetector`` (``plugins`` argument, ``DETECTORS``, entry points)."""
    device_class: str | None = None
    topic: str | None = None
    """MQTT topic filter (``+``, ``#``) the message topic must match."""
    suppress_s: NonNegFloat = 60.0
    """The same (device, detector) is not raised twice within this many seconds."""
    escalate_after_s: PositiveFloat | None = None
    """Unacknowledged and still holding after this long: raise again one severity higher."""

    def __post_init__(self) -> None:
        where = f"detector {self.name!r} (kind {self.kind!r})"
        allowed = _KIND_FIELDS[self.kind]
        for name in sorted(_KIND_SPECIFIC - allowed):
            if getattr(self, name) is not None:
                raise ValueError(f"{where}: `{name}` does not apply to this kind")
        if self.kind in ("threshold", "rate", "zscore") and not self.field:
            raise ValueError(f"{where}: `field` is required")
        if self.kind == "threshold":
            if self.above is None and self.below is None:
                raise ValueError(f"{where}: `above` or `below` is required")
            if self.above is not None and self.below is not None and self.below >= self.above:
                raise ValueError(f"{where}: `below` must be less than `above`")
        elif self.kind == "rate" and self.max_rate_per_s is None:
            raise ValueError(f"{where}: `max_rate_per_s` is required")
        elif self.kind == "silence" and self.silent_s is None:
            raise ValueError(f"{where}: `silent_s` is required")
        elif self.kind == "plugin" and not self.plugin:
            raise ValueError(f"{where}: `plugin` is required")
        if self.topic is not None:
            try:
                compile_topic_filter(self.topic)
            except ValueError as err:
                raise ValueError(f"{where}: `topic`: {err}") from None


class AnomalySection(Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    detectors: list[Detector] = msgspec.field(default_factory=list)
    escalation: EscalationSection = msgspec.field(default_factory=EscalationSection)
    """What each severity sets off: MQTT alert, webhook, audit (``policies.alerts``)."""

    def __post_init__(self) -> None:
        seen: set[str] = set()
        for i, det in enumerate(self.detectors):
            if det.name in seen:
                raise ValueError(f"detectors[{i}].name: duplicate detector name {det.name!r}")
            seen.add(det.name)


class Anomaly(Struct, frozen=True, kw_only=True):
    detector: str
    device: str
    severity: Severity
    value: float | None
    reason: str
    raised_at: float
    escalated: bool = False


# --------------------------------------------------------------------------- plugins


@runtime_checkable
class CustomDetector(Protocol):
    """A third-party detector. Return an ``Anomaly`` when ``data`` is anomalous.

    The returned anomaly's ``detector`` name is replaced by the configured one; its
    severity, value and reason are kept. It must keep its own state compact.
    """

    def check(self, device: str, data: dict[str, Any] | None, now: float) -> Anomaly | None:
        ...


DETECTORS: dict[str, CustomDetector] = {}
"""Registered custom detectors by name (in-process registrations and loaded entry points)."""


def register_detector(name: str, detector: CustomDetector) -> None:
    DETECTORS[name] = detector


def load_entry_points(
    entry_points: Callable[..., Iterable[Any]] = importlib.metadata.entry_points,
) -> None:
    """Add the ``iot_gateway.detectors`` entry points to ``DETECTORS`` (a class is instantiated)."""
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in DETECTORS:
            continue
        obj = ep.load()
        if isinstance(obj, type):
            obj = obj()
        if not isinstance(obj, CustomDetector):
            raise TypeError(f"entry point {ep.name!r} is not a detector (no check method)")
        DETECTORS[ep.name] = obj


# --------------------------------------------------------------------------- runtime

_NAN = math.nan
_INF = math.inf


def _number(data: dict[str, Any] | None, field: str) -> float | None:
    if data is None:
        return None
    value = data.get(field)
    # bool is an int subclass, and a sensor flag is not a reading
    if value.__class__ is float or value.__class__ is int:
        return value
    return None


class _Rule:
    """A compiled detector. ``observe`` returns (value, reason) when it fires."""

    stateful = False

    def __init__(self, index: int, cfg: Detector) -> None:
        self.index = index
        self.cfg = cfg
        self.name = cfg.name
        self.field = cfg.field or ""
        self.severity = _SEVERITY_INDEX[cfg.severity]
        self.topic_re: re.Pattern[str] | None = (
            compile_topic_filter(cfg.topic) if cfg.topic is not None else None
        )

    def grow(self) -> None:
        """A new device slot was allocated (stateful rules extend their slabs)."""

    def observe(self, device: str, slot: int, data: dict[str, Any] | None,
                now: float) -> tuple[float | None, str] | Anomaly | None:
        raise NotImplementedError


class _Threshold(_Rule):
    def __init__(self, index: int, cfg: Detector) -> None:
        super().__init__(index, cfg)
        self.above = _INF if cfg.above is None else cfg.above
        self.below = -_INF if cfg.below is None else cfg.below

    def observe(self, device: str, slot: int, data: dict[str, Any] | None,
                now: float) -> tuple[float | None, str] | None:
        v = _number(data, self.field)
        if v is None:
            return None
        if v > self.above:
            return v, f"{self.field} {v} above {self.above}"
        if v < self.below:
            return v, f"{self.field} {v} below {self.below}"
        return None


class _Rate(_Rule):
    stateful = True

    def __init__(self, index: int, cfg: Detector) -> None:
        super().__init__(index, cfg)
        assert cfg.max_rate_per_s is not None
        self.max_rate = cfg.max_rate_per_s
        self.prev_value = array("d")
        self.prev_time = array("d")

    def grow(self) -> None:
        self.prev_value.append(_NAN)
        self.prev_time.append(_NAN)

    def observe(self, device: str, slot: int, data: dict[str, Any] | None,
                now: float) -> tuple[float | None, str] | None:
        v = _number(data, self.field)
        if v is None:
            return None
        pv = self.prev_value[slot]
        dt = now - self.prev_time[slot]  # NaN for the first reading: compares False below
        self.prev_value[slot] = v
        self.prev_time[slot] = now
        if dt > 0:
            rate = abs(v - pv) / dt
            if rate > self.max_rate:
                return v, f"{self.field} changed {rate:.4g}/s, limit {self.max_rate}/s"
        return None


class _ZScore(_Rule):
    """EWMA mean and variance (West/Finch incremental form) per device."""

    stateful = True

    def __init__(self, index: int, cfg: Detector) -> None:
        super().__init__(index, cfg)
        self.alpha = cfg.alpha if cfg.alpha is not None else _ZSCORE_DEFAULTS["alpha"]
        self.z = cfg.z if cfg.z is not None else _ZSCORE_DEFAULTS["z"]
        self.min_samples = int(cfg.min_samples if cfg.min_samples is not None
                               else _ZSCORE_DEFAULTS["min_samples"])
        self.min_var = (cfg.min_std or 0.0) ** 2
        self.mean = array("d")
        self.var = array("d")
        self.count = array("H")  # capped at min_samples (≤ 65535 enforced below)
        self.min_samples = min(self.min_samples, 65535)

    def grow(self) -> None:
        self.mean.append(0.0)
        self.var.append(0.0)
        self.count.append(0)

    def observe(self, device: str, slot: int, data: dict[str, Any] | None,
                now: float) -> tuple[float | None, str] | None:
        x = _number(data, self.field)
        if x is None:
            return None
        n = self.count[slot]
        if n == 0:
            self.mean[slot] = x
            self.count[slot] = 1
            return None
        mean = self.mean[slot]
        var = self.var[slot]
        diff = x - mean
        hit: tuple[float | None, str] | None = None
        if n >= self.min_samples:
            v = var if var > self.min_var else self.min_var
            if v > 0.0:
                if diff * diff > self.z * self.z * v:
                    hit = x, f"{self.field} {x} is {abs(diff) / math.sqrt(v):.3g}σ from " \
                             f"baseline {mean:.4g}"
            elif diff != 0.0:
                hit = x, f"{self.field} {x} departs from flat baseline {mean:.4g}"
        else:
            self.count[slot] = n + 1
        incr = self.alpha * diff
        self.mean[slot] = mean + incr
        self.var[slot] = (1.0 - self.alpha) * (var + diff * incr)
        return hit


class _Silence(_Rule):
    stateful = True

    def __init__(self, index: int, cfg: Detector) -> None:
        super().__init__(index, cfg)
        assert cfg.silent_s is not None
        self.silent_s = cfg.silent_s
        self.last_seen = array("d")  # NaN: this detector does not watch the slot
        self.raised = array("B")
        self.next_due = _INF  # no watched device can be overdue before this

    def grow(self) -> None:
        self.last_seen.append(_NAN)
        self.raised.append(0)

    def observe(self, device: str, slot: int, data: dict[str, Any] | None,
                now: float) -> None:
        self.last_seen[slot] = now
        if self.raised[slot]:
            self.raised[slot] = 0
        due = now + self.silent_s
        if due < self.next_due:
            self.next_due = due
        return None

    def overdue(self, slots: Mapping[str, int], now: float) -> list[tuple[str, float]]:
        """Devices silent for longer than ``silent_s``, each once until it speaks again."""
        if now < self.next_due:
            return []
        limit = now - self.silent_s
        last_seen = self.last_seen
        raised = self.raised
        found: list[tuple[str, float]] = []
        oldest = _INF
        for device, slot in slots.items():
            t = last_seen[slot]
            if t != t or raised[slot]:  # NaN: not watched
                continue
            if t < limit:
                raised[slot] = 1
                found.append((device, now - t))
            elif t < oldest:
                oldest = t
        self.next_due = oldest + self.silent_s
        return found


class _Plugin(_Rule):
    def __init__(self, index: int, cfg: Detector, impl: CustomDetector) -> None:
        super().__init__(index, cfg)
        self.impl = impl

    def observe(self, device: str, slot: int, data: dict[str, Any] | None,
                now: float) -> Anomaly | None:
        return self.impl.check(device, data, now)


class _Record:
    """What the raise gate remembers about one raised (device, detector) pair."""

    __slots__ = ("acked", "changed_at", "holding", "raised_at", "reason", "severity", "value")

    def __init__(self, severity: int, value: float | None, reason: str, now: float) -> None:
        self.severity = severity
        self.value = value
        self.reason = reason
        self.raised_at = now
        self.changed_at = now
        self.acked = False
        self.holding = True


_RULES: dict[str, type[_Rule]] = {
    "threshold": _Threshold, "rate": _Rate, "zscore": _ZScore, "silence": _Silence,
}


class AnomalyDetector:
    """Triage of one gateway: ``check`` per message, ``check_silence`` and ``escalations``
    from a 1 s timer, ``acknowledge`` from the operator."""

    def __init__(self, section: AnomalySection,
                 plugins: Mapping[str, CustomDetector] | None = None) -> None:
        self.section = section
        self.suppressed = 0
        self._rules: list[_Rule] = []
        for i, cfg in enumerate(section.detectors):
            if cfg.kind == "plugin":
                assert cfg.plugin is not None
                impl = (plugins or {}).get(cfg.plugin) or DETECTORS.get(cfg.plugin)
                if impl is None:
                    load_entry_points()
                    impl = DETECTORS.get(cfg.plugin)
                if impl is None:
                    raise ValueError(f"detectors[{i}].plugin: unknown detector plugin "
                                     f"{cfg.plugin!r}")
                self._rules.append(_Plugin(i, cfg, impl))
            else:
                self._rules.append(_RULES[cfg.kind](i, cfg))
        self._stateful = [r for r in self._rules if r.stateful]
        self._silence = [r for r in self._rules if isinstance(r, _Silence)]
        self._by_name = {r.name: r for r in self._rules}
        self._by_class: dict[str, tuple[_Rule, ...]] = {}
        self._slots: dict[str, int] = {}
        self._active: dict[str, dict[int, _Record]] = {}

    # ---- ingest path

    def _rules_for_class(self, device_class: str) -> tuple[_Rule, ...]:
        rules = tuple(r for r in self._rules
                      if r.cfg.device_class is None or r.cfg.device_class == device_class)
        self._by_class[device_class] = rules
        return rules

    def _slot(self, device: str) -> int:
        slot = len(self._slots)
        self._slots[device] = slot
        for rule in self._stateful:
            rule.grow()
        return slot

    def applies(self, device_class: str, topic: str) -> bool:
        """Whether any detector looks at messages of this class on this topic (callers cache
        it per topic, so that other messages skip triage and its payload decode)."""
        rules = self._by_class.get(device_class)
        if rules is None:
            rules = self._rules_for_class(device_class)
        return any(r.topic_re is None or r.topic_re.match(topic) is not None for r in rules)

    def check(self, device: str, data: dict[str, Any] | None, device_class: str = "",
              topic: str = "", now: float = 0.0) -> list[Anomaly] | None:
        """Anomalies raised by this message (``None`` when there are none)."""
        rules = self._by_class.get(device_class)
        if rules is None:
            rules = self._rules_for_class(device_class)
        if not rules:
            return None
        slot = -1
        out: list[Anomaly] | None = None
        records = self._active.get(device) if self._active else None
        for rule in rules:
            if rule.topic_re is not None and rule.topic_re.match(topic) is None:
                continue
            if rule.stateful and slot < 0:
                s = self._slots.get(device)
                slot = self._slot(device) if s is None else s
            hit = rule.observe(device, slot, data, now)
            if hit is None:
                if records is not None:
                    rec = records.get(rule.index)
                    if rec is not None:
                        rec.holding = False
                continue
            if isinstance(hit, Anomaly):
                anomaly = self._raise(rule, device, hit.value, hit.reason, now,
                                      _SEVERITY_INDEX[hit.severity])
            else:
                anomaly = self._raise(rule, device, hit[0], hit[1], now, rule.severity)
            if anomaly is not None:
                if out is None:
                    out = [anomaly]
                else:
                    out.append(anomaly)
        return out

    def check_envelope(self, envelope: Any, now: float) -> list[Anomaly] | None:
        """``check`` for a gateway ``Envelope`` (its decoded ``data`` must be set)."""
        data = envelope.data
        return self.check(envelope.device, data if isinstance(data, dict) else None,
                          envelope.device_class, envelope.topic, now)

    def _raise(self, rule: _Rule, device: str, value: float | None, reason: str,
               now: float, severity: int) -> Anomaly | None:
        records = self._active.get(device)
        if records is None:
            records = self._active[device] = {}
        rec = records.get(rule.index)
        if rec is not None and now - rec.raised_at < rule.cfg.suppress_s:
            self.suppressed += 1
            rec.holding = True
            rec.value = value
            return None
        if rec is not None and rec.holding and not rec.acked:
            # the same condition, still unacknowledged: keep its level and escalation clock
            rec.raised_at = now
            rec.value = value
            rec.reason = reason
            severity = rec.severity
        else:
            records[rule.index] = _Record(severity, value, reason, now)
        return Anomaly(detector=rule.name, device=device, severity=SEVERITIES[severity],
                       value=value, reason=reason, raised_at=now)

    # ---- timer path

    def check_silence(self, now: float) -> list[Anomaly]:
        out: list[Anomaly] = []
        for rule in self._silence:
            for device, quiet in rule.overdue(self._slots, now):
                anomaly = self._raise(rule, device, quiet,
                                      f"silent for {quiet:.0f}s (limit {rule.silent_s:g}s)",
                                      now, rule.severity)
                if anomaly is not None:
                    out.append(anomaly)
        return out

    def acknowledge(self, device: str, detector: str) -> bool:
        """Stop escalating this (device, detector); False if nothing was raised."""
        rule = self._by_name.get(detector)
        rec = self._active.get(device, {}).get(rule.index) if rule is not None else None
        if rec is None:
            return False
        rec.acked = True
        return True

    def escalations(self, now: float) -> list[Anomaly]:
        """Re-raise, one level up, what is unacknowledged and still holding; forget the rest
        once their suppression window is over."""
        out: list[Anomaly] = []
        emergency = len(SEVERITIES) - 1
        for device in list(self._active):
            records = self._active[device]
            for index in list(records):
                rec = records[index]
                cfg = self._rules[index].cfg
                if not rec.holding:
                    if now - rec.raised_at >= cfg.suppress_s:
                        del records[index]
                    continue
                after = cfg.escalate_after_s
                if (after is None or rec.acked or rec.severity >= emergency
                        or now - rec.changed_at < after):
                    continue
                waited = now - rec.changed_at
                rec.severity += 1
                rec.changed_at = now
                out.append(Anomaly(detector=cfg.name, device=device,
                                   severity=SEVERITIES[rec.severity], value=rec.value,
                                   reason=f"unacknowledged for {waited:.0f}s: {rec.reason}",
                                   raised_at=now, escalated=True))
            if not records:
                del self._active[device]
        return out

    # ---- introspection

    @property
    def devices(self) -> int:
        """Devices holding per-device state."""
        return len(self._slots)

    def active(self, device: str) -> dict[str, Severity]:
        """Raised detectors of a device and their current severity."""
        return {self._rules[i].name: SEVERITIES[r.severity]
                for i, r in self._active.get(device, {}).items()}
