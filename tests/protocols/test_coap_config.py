"""``[coap]``: defaults, and errors that name their place."""

from __future__ import annotations

import msgspec
import pytest

from protocols.coap.config import CoapSection


def parse(text: str) -> CoapSection:
    return msgspec.toml.decode(text, type=CoapSection)


def test_defaults() -> None:
    section = parse("")
    assert section.enabled
    assert section.listen == "0.0.0.0:5683"
    assert (section.telemetry_path, section.commands_path) == (("t",), ("c",))
    assert (section.telemetry_topic, section.commands_topic) == ("coap/{device}",
                                                                 "commands/{device}")
    assert section.psk == {} and not section.require_psk


def test_a_full_section() -> None:
    section = parse("""
        listen = "[::]:0"
        telemetry_resource = "/api/v1/t"
        commands_resource = "api/v1/c"
        telemetry_topic = "sites/a/{device}/coap"
        max_payload = 4096
        require_psk = true
        [psk]
        "pump-7" = "0123456789abcdef"
        "urn:dev:mac:0024befffe804ff1" = "another-key"
    """)
    assert section.telemetry_path == ("api", "v1", "t")
    assert section.psk["pump-7"] == "0123456789abcdef"


@pytest.mark.parametrize(("text", "error"), [
    ('listen = "nowhere"', "expected HOST:PORT"),
    ('telemetry_resource = ""', "telemetry_resource"),
    ('commands_resource = "a//b"', "commands_resource"),
    ('telemetry_resource = "x"\ncommands_resource = "/x/"', "must differ"),
    ('telemetry_topic = "coap/all"', "must contain {device}"),
    ('telemetry_topic = "{device}/{device}"', "must contain {device}"),
    ('commands_topic = "commands/{device}/+"', "not a valid topic name"),
    ('commands_topic = "$SYS/{device}"', "not a valid topic name"),
    ('telemetry_topic = "t/{device}/{x}"', "only {device}"),
    ("max_payload = 10", r"Expected `int` >= 64 - at `\$.max_payload`"),
    ('[psk]\n"pump-7" = "short"', r"at `\$.psk\[...\]`"),
    ('[psk]\n"a/b" = "long-enough-key"', "psk"),
    ("unknown = 1", "unknown field `unknown`"),
])
def test_errors_name_their_place(text: str, error: str) -> None:
    with pytest.raises(msgspec.ValidationError, match=error):
        parse(text)
