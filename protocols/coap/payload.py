"""CoAP request payloads → the JSON the gateway stores (sans-I/O: bytes in, bytes out).

Whatever a device sends, the lake and the pipelines see JSON, as they do for MQTT:

* JSON (content format 50), or no content format / another one with a payload that is
  valid JSON: stored as sent (only checked).
* CBOR (60): decoded and re-encoded as JSON. Byte strings become base64 strings, map keys
  that are numbers become strings, NaN and infinities become ``null``; what JSON cannot
  hold (other tags, ``undefined``, maps keyed by arrays) is refused.
* SenML JSON (110) and SenML CBOR (112), RFC 8428: **one message per pack**, so that a
  request is one message, made durable and acknowledged as a whole. The pack is resolved
  (§4.6: base name, time, unit, value and sum applied; relative times made absolute from
  the time of receipt) and stored as one JSON object::

      {"temp": 21.5, "hum": 40,
       "senml": [{"n": "urn:dev:th-1:temp", "u": "Cel", "t": 1700000000.0, "v": 21.5},
                 {"n": "urn:dev:th-1:hum", "u": "%RH", "t": 1700000000.0, "v": 40}]}

  Each record's own name (``n`` without the base name; the full name when ``n`` is empty)
  is also a top-level field holding its value (``v``, ``vs``, ``vb``, ``vd``, else its sum
  ``s``; the last record of a name wins), so that schemas, enrichment and anomaly
  detectors, which read top-level fields, work on SenML as on any JSON reading. The full
  records stay under ``"senml"`` (a record named ``senml`` does not get a top-level field).

Anything that cannot be decoded raises ``PayloadError`` (the server answers 4.00).
"""

from __future__ import annotations

import base64
import io
import re
from typing import Any

import cbor2
import msgspec

JSON = 50
CBOR = 60
SENML_JSON = 110
SENML_CBOR = 112
OCTET_STREAM = 42

RELATIVE_TIME_LIMIT = 2**28
"""RFC 8428 §4.5.3: times below 2**28 are relative to now."""
SENML_VERSION = 10
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9:./_-]*\Z")
# RFC 8428 §6, table 4: the CBOR labels of the registered fields.
_CBOR_LABELS = {-1: "bver", -2: "bn", -3: "bt", -4: "bu", -5: "bv", -6: "bs", 0: "n", 1: "u",
                2: "v", 3: "vs", 4: "vb", 5: "s", 6: "t", 7: "ut", 8: "vd"}
_VALUE_FIELDS = ("v", "vs", "vb", "vd")

_check_json = msgspec.json.Decoder(msgspec.Raw).decode
_decode_senml_json = msgspec.json.Decoder(list[dict[str, Any]]).decode
_encode_json = msgspec.json.Encoder().encode


class PayloadError(ValueError):
    """The payload cannot be decoded in its content format; the message says why."""


def to_json(payload: bytes, content_format: int | None, now: float) -> bytes:
    """The payload as JSON bytes, per its CoAP content format; ``now``: the time of
    receipt (Unix seconds), for SenML relative times."""
    if not payload:
        raise PayloadError("empty payload")
    if content_format == CBOR:
        return _cbor_to_json(payload)
    if content_format == SENML_JSON:
        try:
            records = _decode_senml_json(payload)
        except msgspec.DecodeError as err:  # ValidationError included
            raise PayloadError(f"SenML JSON: {err}") from None
        return _encode_json(resolve_senml(records, now))
    if content_format == SENML_CBOR:
        return _encode_json(resolve_senml(_senml_cbor_records(payload), now))
    # JSON, no content format, or one we do not decode: accepted if it is JSON.
    try:
        _check_json(payload)
    except msgspec.DecodeError as err:
        what = "JSON" if content_format in (JSON, None) else (
            f"content format {content_format} (only JSON payloads are taken in formats other "
            "than 50, 60, 110 and 112)")
        raise PayloadError(f"{what}: {err}") from None
    return payload


def _load_cbor(payload: bytes) -> Any:
    stream = io.BytesIO(payload)
    try:
        value = cbor2.CBORDecoder(stream, max_depth=64).decode()
    except (cbor2.CBORError, ValueError, TypeError, OverflowError, RecursionError) as err:
        raise PayloadError(f"CBOR: {err}") from None
    if stream.tell() != len(payload):
        raise PayloadError(f"CBOR: {len(payload) - stream.tell()} bytes after the data item")
    return value


def _cbor_to_json(payload: bytes) -> bytes:
    value = _load_cbor(payload)
    try:
        return _encode_json(value)
    except (TypeError, ValueError, OverflowError, RecursionError) as err:
        raise PayloadError(f"CBOR: cannot be expressed as JSON: {err}") from None


def _senml_cbor_records(payload: bytes) -> list[dict[str, Any]]:
    pack = _load_cbor(payload)
    if not isinstance(pack, list):
        raise PayloadError("SenML CBOR: expected an array of records")
    records: list[dict[str, Any]] = []
    for i, record in enumerate(pack):
        if not isinstance(record, dict):
            raise PayloadError(f"SenML CBOR: record {i}: expected a map")
        named: dict[str, Any] = {}
        for key, value in record.items():
            if isinstance(key, int) and not isinstance(key, bool):
                label = _CBOR_LABELS.get(key)
                if label is None:
                    continue  # an unknown extension field that need not be understood
                named[label] = value
            elif isinstance(key, str):
                named[key] = value
            else:
                raise PayloadError(f"SenML CBOR: record {i}: label {key!r} is neither an "
                                   "integer nor a string")
        records.append(named)
    return records


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


_TYPES: dict[str, tuple[str, Any]] = {
    "bn": ("a string", str), "bu": ("a string", str), "n": ("a string", str),
    "u": ("a string", str), "vs": ("a string", str), "vb": ("a boolean", bool),
    "vd": ("a base64url string or bytes", (str, bytes)),
}
_NUMBERS = frozenset({"bt", "bv", "bs", "v", "s", "t", "ut"})


def resolve_senml(records: list[dict[str, Any]], now: float) -> dict[str, Any]:
    """A SenML pack (records with their field names) → the stored object (module doc)."""
    if not records:
        raise PayloadError("SenML: empty pack")
    base_name, base_time, base_unit = "", 0, None
    base_value: float | None = None
    base_sum: float | None = None
    resolved: list[dict[str, Any]] = []
    fields: dict[str, Any] = {}
    for i, record in enumerate(records):
        where = f"SenML record {i}"
        for key, given in record.items():
            if key.endswith("_"):
                raise PayloadError(f"{where}: must-understand field {key!r} is not supported")
            if key in _NUMBERS:
                if not _number(given):
                    raise PayloadError(f"{where}: {key} must be a number")
            elif key in _TYPES:
                what, kind = _TYPES[key]
                if not isinstance(given, kind):
                    raise PayloadError(f"{where}: {key} must be {what}")
            elif key == "bver" and (type(given) is not int or given > SENML_VERSION):
                raise PayloadError(f"{where}: bver {given!r} is not a version up to "
                                   f"{SENML_VERSION}")
        if "bn" in record:
            base_name = record["bn"]
        if "bt" in record:
            base_time = record["bt"]
        if "bu" in record:
            base_unit = record["bu"]
        if "bv" in record:
            base_value = record["bv"]
        if "bs" in record:
            base_sum = record["bs"]
        own_name = record.get("n", "")
        name = base_name + own_name
        if not _NAME.match(name):
            raise PayloadError(f"{where}: name {name!r} is empty or not a valid SenML name")
        values = [k for k in _VALUE_FIELDS if k in record]
        if len(values) > 1:
            raise PayloadError(f"{where}: more than one value ({', '.join(values)})")
        out: dict[str, Any] = {"n": name}
        unit = record.get("u", base_unit)
        if unit is not None:
            out["u"] = unit
        t = base_time + record.get("t", 0)
        out["t"] = now + t if t < RELATIVE_TIME_LIMIT else t
        value: Any = None
        if values:
            key = values[0]
            value = record[key]
            if key == "v" and base_value is not None:
                value += base_value
            elif key == "vd":
                value = _base64url(value, where)
            out[key] = value
        elif base_value is not None and "s" not in record:
            value = out["v"] = base_value
        if "s" in record:
            out["s"] = record["s"] + (base_sum or 0)
            if value is None:
                value = out["s"]
        if value is None:
            raise PayloadError(f"{where}: no value and no sum")
        if "ut" in record:
            out["ut"] = record["ut"]
        resolved.append(out)
        fields[own_name or name] = value
    fields.pop("senml", None)
    fields["senml"] = resolved
    return fields


def _base64url(value: str | bytes, where: str) -> str:
    """``vd`` as SenML JSON carries it: base64url without padding."""
    if isinstance(value, bytes):
        return base64.urlsafe_b64encode(value).rstrip(b"=").decode()
    try:
        base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    except ValueError:
        raise PayloadError(f"{where}: vd is not base64url") from None
    return value


def content_format_of(payload: bytes, content_type: str | None = None) -> int:
    """The content format to announce for a command's payload: from its MQTT 5 content
    type when it names one we know, else JSON when it parses as JSON, else octet-stream."""
    if content_type is not None:
        known = {"application/json": JSON, "application/cbor": CBOR,
                 "application/senml+json": SENML_JSON, "application/senml+cbor": SENML_CBOR,
                 "application/octet-stream": OCTET_STREAM, "text/plain": 0,
                 "text/plain; charset=utf-8": 0}
        found = known.get(content_type.strip().lower())
        if found is not None:
            return found
    if payload:
        try:
            _check_json(payload)
        except msgspec.DecodeError:
            return OCTET_STREAM
        return JSON
    return OCTET_STREAM
