"""CoAP payloads → stored JSON, from bytes alone (``protocols.coap.payload``)."""

from __future__ import annotations

import json
import math
from typing import Any

import cbor2
import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocols.coap.payload import (
    CBOR,
    JSON,
    OCTET_STREAM,
    SENML_CBOR,
    SENML_JSON,
    PayloadError,
    content_format_of,
    resolve_senml,
    to_json,
)

NOW = 1_700_000_000.0


def decoded(payload: bytes, content_format: int | None) -> Any:
    return json.loads(to_json(payload, content_format, NOW))


# -- JSON ---------------------------------------------------------------------------------
@pytest.mark.parametrize("content_format", [JSON, None, 0, OCTET_STREAM, 1234])
def test_json_is_stored_as_sent(content_format: int | None) -> None:
    payload = b'{"heart_rate": 72, "tags": ["a"]}'
    assert to_json(payload, content_format, NOW) is payload


@pytest.mark.parametrize("payload", [b'{"a": ', b"\xff\x00", b"plain text", b'{"a": 1} x',
                                     b""])
@pytest.mark.parametrize("content_format", [JSON, None, 0])
def test_what_is_not_json_is_refused(payload: bytes, content_format: int | None) -> None:
    with pytest.raises(PayloadError):
        to_json(payload, content_format, NOW)


# -- CBOR ---------------------------------------------------------------------------------
def test_cbor_becomes_json() -> None:
    value = {"kwh": 2.5, "count": 3, "ok": True, "none": None, "list": [1, "x"],
             "raw": b"\x01\x02", 7: "int key", "nan": math.nan}
    assert decoded(cbor2.dumps(value), CBOR) == {
        "kwh": 2.5, "count": 3, "ok": True, "none": None, "list": [1, "x"], "raw": "AQI=",
        "7": "int key", "nan": None}


@pytest.mark.parametrize("payload", [
    b"\x9f\x01",  # truncated indefinite array
    cbor2.dumps(1) + b"\x01",  # trailing bytes
    cbor2.dumps(cbor2.CBORTag(4711, 1)),  # a tag JSON cannot hold
    cbor2.dumps(cbor2.undefined),
    b"\x1c",  # reserved additional information
], ids=["truncated", "trailing", "tag", "undefined", "reserved"])
def test_broken_or_unrepresentable_cbor_is_refused(payload: bytes) -> None:
    with pytest.raises(PayloadError, match="CBOR"):
        to_json(payload, CBOR, NOW)


def test_deeply_nested_cbor_is_refused() -> None:
    with pytest.raises(PayloadError):
        to_json(b"\x81" * 1000 + b"\x01", CBOR, NOW)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.text()
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20)


@given(json_values)
def test_cbor_round_trips_through_json(value: Any) -> None:
    assert msgspec.json.decode(to_json(cbor2.dumps(value), CBOR, NOW)) == value


# -- SenML --------------------------------------------------------------------------------
RFC8428_MULTIPLE = [  # RFC 8428 §5.1.2, multiple data points
    {"bn": "urn:dev:ow:10e2073a01080063:", "n": "voltage", "u": "V", "v": 120.1},
    {"n": "current", "u": "A", "v": 1.2},
]


def test_senml_json_pack_is_one_object() -> None:
    out = decoded(json.dumps(RFC8428_MULTIPLE).encode(), SENML_JSON)
    assert out == {
        "voltage": 120.1, "current": 1.2,
        "senml": [{"n": "urn:dev:ow:10e2073a01080063:voltage", "u": "V", "t": NOW,
                   "v": 120.1},
                  {"n": "urn:dev:ow:10e2073a01080063:current", "u": "A", "t": NOW, "v": 1.2}]}


def test_senml_base_fields_and_times() -> None:
    pack = [{"bn": "dev1/", "bt": 1.32e9, "bu": "A", "bv": 10, "bs": 100, "bver": 10,
             "n": "i", "v": 1.5, "t": -1},
            {"n": "i", "v": 2, "t": 0},
            {"n": "kwh", "s": 5, "u": "kWh"},
            {"bt": 0, "n": "on", "vb": True, "t": -5},
            {"n": "fw", "vs": "1.2.3", "bu": "x"},
            {"n": "blob", "vd": "AQI"},
            {"n": "base-only"}]
    out = resolve_senml(pack, NOW)
    records = out.pop("senml")
    assert out == {"i": 12, "kwh": 105, "on": True, "fw": "1.2.3", "blob": "AQI",
                   "base-only": 10}
    assert records[0] == {"n": "dev1/i", "u": "A", "t": 1.32e9 - 1, "v": 11.5}
    assert records[1]["v"] == 12
    assert records[2] == {"n": "dev1/kwh", "u": "kWh", "t": 1.32e9, "s": 105}
    assert records[3]["t"] == NOW - 5  # relative to the time of receipt
    assert records[4]["u"] == "x"
    assert records[6]["v"] == 10  # no value: the base value


def test_senml_cbor_labels() -> None:
    pack = [{-2: "urn:dev:th-2:", -3: 1.7e9, 0: "temp", 1: "Cel", 2: 19, 6: 1},
            {0: "raw", 8: b"\x01\x02\x03"},
            {0: "extra", 4: False, 99: "ignored", "ext": 1}]
    out = decoded(cbor2.dumps(pack), SENML_CBOR)
    assert (out["temp"], out["raw"], out["extra"]) == (19, "AQID", False)
    assert out["senml"][0] == {"n": "urn:dev:th-2:temp", "u": "Cel", "t": 1.7e9 + 1, "v": 19}


@pytest.mark.parametrize(("pack", "why"), [
    ([], "empty pack"),
    ({"n": "x", "v": 1}, "array"),
    ([{"n": "x"}], "no value"),
    ([{"v": 1}], "name"),
    ([{"n": "-bad", "v": 1}], "name"),
    ([{"n": "x", "v": "1"}], "v must be a number"),
    ([{"n": "x", "v": True}], "v must be a number"),
    ([{"n": "x", "vb": 1}], "vb must be a boolean"),
    ([{"n": "x", "v": 1, "vs": "a"}], "more than one value"),
    ([{"n": "x", "v": 1, "t_": 5}], "must-understand"),
    ([{"bver": 11, "n": "x", "v": 1}], "bver"),
    ([{"n": "x", "vd": "a!b"}], "base64url"),
    ([{"bn": 5, "n": "x", "v": 1}], "bn must be a string"),
])
def test_bad_senml_is_refused(pack: Any, why: str) -> None:
    with pytest.raises(PayloadError, match=why):
        to_json(json.dumps(pack).encode(), SENML_JSON, NOW)
    if isinstance(pack, list):
        with pytest.raises(PayloadError):
            to_json(cbor2.dumps(pack), SENML_CBOR, NOW)


def test_senml_cbor_with_bad_labels_is_refused() -> None:
    with pytest.raises(PayloadError, match="label"):
        to_json(cbor2.dumps([{1.5: "x"}]), SENML_CBOR, NOW)
    with pytest.raises(PayloadError, match="map"):
        to_json(cbor2.dumps([1]), SENML_CBOR, NOW)


def test_a_record_named_senml_keeps_the_records() -> None:
    out = resolve_senml([{"n": "senml", "v": 1}], NOW)
    assert list(out) == ["senml"] and out["senml"][0]["v"] == 1


# -- commands ------------------------------------------------------------------------------
@pytest.mark.parametrize(("payload", "content_type", "expected"), [
    (b'{"open": true}', None, JSON),
    (b"\x00raw", None, OCTET_STREAM),
    (b"", None, OCTET_STREAM),
    (b"\xa1", "application/cbor", CBOR),
    (b'{"x": 1}', "application/octet-stream", OCTET_STREAM),
    (b"hello", "text/plain", 0),
    (b'{"x": 1}', "application/x-unknown", JSON),
])
def test_content_format_of_commands(payload: bytes, content_type: str | None,
                                    expected: int) -> None:
    assert content_format_of(payload, content_type) == expected
