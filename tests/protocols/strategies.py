"""Hypothesis strategies for every MQTT packet type, in MQTT 3.1.1 (4) and 5.0 (5).

Each strategy draws only packets the specification allows, in the given version, so that
`decode(encode(p, v), v) == (p, len)` must hold for all of them.
"""

from collections.abc import Callable
from typing import Any

from hypothesis import strategies as st

from protocols.mqtt.packets import (
    ALLOWED_PROPERTIES,
    MQTT_3_1_1,
    MQTT_5,
    PROPERTIES,
    REASON_CODES,
    V311_CONNACK_CODES,
    V311_SUBACK_CODES,
    Auth,
    Connack,
    Connect,
    Disconnect,
    Packet,
    Pingreq,
    Pingresp,
    Puback,
    Pubcomp,
    Publish,
    Pubrec,
    Pubrel,
    Suback,
    Subscribe,
    SubscriptionOptions,
    Unsuback,
    Unsubscribe,
    Will,
)

VERSIONS = (MQTT_3_1_1, MQTT_5)

# Any Unicode scalar value but U+0000 (surrogates cannot be encoded as UTF-8).
mqtt_text = st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\x00"), max_size=20)
_level_text = st.text(
    alphabet=st.characters(codec="utf-8", exclude_characters="\x00+#/"), max_size=8
)
topic_names = st.lists(_level_text, min_size=1, max_size=4).map("/".join).filter(bool)
packet_ids = st.integers(1, 65535)
small_bytes = st.binary(max_size=40)


@st.composite
def topic_filters(draw: st.DrawFn, version: int) -> str:
    levels = draw(st.lists(st.one_of(_level_text, st.just("+")), min_size=1, max_size=4))
    if draw(st.booleans()):
        levels.append("#")
    topic_filter = "/".join(levels)
    if not topic_filter:
        topic_filter = "#"
    if version == MQTT_5 and draw(st.booleans()):
        share_name = draw(_level_text.filter(bool))
        topic_filter = f"$share/{share_name}/{topic_filter}"
    return topic_filter


_BYTE, _TWO, _FOUR, _VARINT, _STRING, _BINARY, _PAIR = range(7)


def _property_value(name: str, kind: int) -> st.SearchStrategy[Any]:
    if kind == _BYTE:
        return st.integers(0, 1)  # every byte property is a 0/1 flag (maximum_qos too)
    if kind == _TWO:
        low = 1 if name in ("receive_maximum", "topic_alias") else 0
        return st.integers(low, 65535)
    if kind == _FOUR:
        return st.integers(1 if name == "maximum_packet_size" else 0, 2**32 - 1)
    if kind == _VARINT:
        return st.integers(1, 268_435_455)
    if kind == _STRING:
        return topic_names if name == "response_topic" else mqtt_text
    if kind == _BINARY:
        return small_bytes
    return st.tuples(mqtt_text, mqtt_text)


def properties(
    where: str, **overrides: st.SearchStrategy[Any]
) -> st.SearchStrategy[dict[str, Any]]:
    """MQTT 5 properties valid in `where` (a packet name, or "WILL")."""
    optional: dict[str, st.SearchStrategy[Any]] = {}
    for ident in ALLOWED_PROPERTIES[where]:
        name, kind = PROPERTIES[ident]
        value = _property_value(name, kind)
        if name == "user_property":
            value = st.lists(value, min_size=1, max_size=3)
        elif name == "subscription_identifier":
            value = st.lists(value, min_size=1, max_size=1 if where == "SUBSCRIBE" else 3)
        optional[name] = value
    optional.update(overrides)
    return st.fixed_dictionaries({}, optional=optional)


def _properties_for(version: int, where: str) -> st.SearchStrategy[dict[str, Any]]:
    return properties(where) if version == MQTT_5 else st.just({})


@st.composite
def wills(draw: st.DrawFn, version: int) -> Will:
    return Will(
        draw(topic_names),
        draw(small_bytes),
        draw(st.integers(0, 2)),
        draw(st.booleans()),
        draw(_properties_for(version, "WILL")),
    )


@st.composite
def connects(draw: st.DrawFn, version: int) -> Connect:
    username = draw(st.none() | mqtt_text)
    password = draw(st.none() | small_bytes)
    if version == MQTT_3_1_1 and username is None:
        password = None
    return Connect(
        version,
        draw(mqtt_text),
        draw(st.booleans()),
        draw(st.integers(0, 65535)),
        username,
        password,
        draw(st.none() | wills(version)),
        draw(_properties_for(version, "CONNECT")),
    )


@st.composite
def connacks(draw: st.DrawFn, version: int) -> Connack:
    codes = REASON_CODES["CONNACK"] if version == MQTT_5 else V311_CONNACK_CODES
    code = draw(st.sampled_from(sorted(codes)))
    return Connack(
        draw(st.booleans()) if code == 0 else False, code, draw(_properties_for(version, "CONNACK"))
    )


@st.composite
def publishes(
    draw: st.DrawFn,
    version: int,
    qos: st.SearchStrategy[int] | None = None,
    publish_properties: st.SearchStrategy[dict[str, Any]] | None = None,
) -> Publish:
    """Any valid PUBLISH, including a v5 empty topic that relies on a topic alias."""
    level = draw(qos if qos is not None else st.integers(0, 2))
    if publish_properties is None:
        publish_properties = _properties_for(version, "PUBLISH")
    props = draw(publish_properties)
    topic = draw(topic_names)
    if version == MQTT_5 and "topic_alias" in props and draw(st.booleans()):
        topic = ""
    return Publish(
        topic,
        draw(st.binary(max_size=300)),
        level,
        draw(st.booleans()),
        draw(st.booleans()) if level else False,
        draw(packet_ids) if level else None,
        props,
    )


def _acks(cls: type[Puback] | type[Pubrec] | type[Pubrel] | type[Pubcomp]) -> Callable[[int], Any]:
    where = cls.__name__.upper()

    @st.composite
    def acks(draw: st.DrawFn, version: int) -> Packet:
        if version == MQTT_3_1_1:
            return cls(draw(packet_ids))
        code = draw(st.sampled_from(sorted(REASON_CODES[where])))
        return cls(draw(packet_ids), code, draw(properties(where)))

    return acks


@st.composite
def subscription_options(draw: st.DrawFn, version: int, shared: bool) -> SubscriptionOptions:
    qos = draw(st.integers(0, 2))
    if version == MQTT_3_1_1:
        return SubscriptionOptions(qos)
    return SubscriptionOptions(
        qos,
        False if shared else draw(st.booleans()),
        draw(st.booleans()),
        draw(st.integers(0, 2)),
    )


@st.composite
def subscribes(draw: st.DrawFn, version: int) -> Subscribe:
    subscriptions = []
    for topic_filter in draw(st.lists(topic_filters(version), min_size=1, max_size=4)):
        shared = topic_filter.startswith("$share/")
        subscriptions.append((topic_filter, draw(subscription_options(version, shared))))
    return Subscribe(draw(packet_ids), subscriptions, draw(_properties_for(version, "SUBSCRIBE")))


@st.composite
def subacks(draw: st.DrawFn, version: int) -> Suback:
    codes = REASON_CODES["SUBACK"] if version == MQTT_5 else V311_SUBACK_CODES
    return Suback(
        draw(packet_ids),
        draw(st.lists(st.sampled_from(sorted(codes)), min_size=1, max_size=4)),
        draw(_properties_for(version, "SUBACK")),
    )


@st.composite
def unsubscribes(draw: st.DrawFn, version: int) -> Unsubscribe:
    return Unsubscribe(
        draw(packet_ids),
        draw(st.lists(topic_filters(version), min_size=1, max_size=4)),
        draw(_properties_for(version, "UNSUBSCRIBE")),
    )


@st.composite
def unsubacks(draw: st.DrawFn, version: int) -> Unsuback:
    if version == MQTT_3_1_1:
        return Unsuback(draw(packet_ids))
    return Unsuback(
        draw(packet_ids),
        draw(st.lists(st.sampled_from(sorted(REASON_CODES["UNSUBACK"])), min_size=1, max_size=4)),
        draw(properties("UNSUBACK")),
    )


def pingreqs(version: int) -> st.SearchStrategy[Pingreq]:
    return st.just(Pingreq())


def pingresps(version: int) -> st.SearchStrategy[Pingresp]:
    return st.just(Pingresp())


@st.composite
def disconnects(draw: st.DrawFn, version: int) -> Disconnect:
    if version == MQTT_3_1_1:
        return Disconnect()
    code = draw(st.sampled_from(sorted(REASON_CODES["DISCONNECT"])))
    return Disconnect(code, draw(properties("DISCONNECT")))


@st.composite
def auths(draw: st.DrawFn, version: int) -> Auth:
    code = draw(st.sampled_from(sorted(REASON_CODES["AUTH"])))
    return Auth(code, draw(properties("AUTH")))


PACKET_STRATEGIES: dict[type, Callable[[int], st.SearchStrategy[Any]]] = {
    Connect: connects,
    Connack: connacks,
    Publish: publishes,
    Puback: _acks(Puback),
    Pubrec: _acks(Pubrec),
    Pubrel: _acks(Pubrel),
    Pubcomp: _acks(Pubcomp),
    Subscribe: subscribes,
    Suback: subacks,
    Unsubscribe: unsubscribes,
    Unsuback: unsubacks,
    Pingreq: pingreqs,
    Pingresp: pingresps,
    Disconnect: disconnects,
    Auth: auths,
}
"""Every packet type → a strategy of valid packets of that type, given the version."""

V5_ONLY = frozenset({Auth})


def packets(version: int) -> st.SearchStrategy[Packet]:
    return st.one_of(
        [
            make(version)
            for cls, make in PACKET_STRATEGIES.items()
            if version == MQTT_5 or cls not in V5_ONLY
        ]
    )


def client_publishes(
    version: int, qos: st.SearchStrategy[int] | None = None
) -> st.SearchStrategy[Publish]:
    """PUBLISH packets a client may send to this server: no topic alias (the server allows
    none) and no subscription identifier (server to client only)."""
    client_properties = properties(
        "PUBLISH", topic_alias=st.nothing(), subscription_identifier=st.nothing()
    )
    return publishes(version, qos, client_properties if version == MQTT_5 else st.just({}))


def client_packets_after_connect(version: int) -> st.SearchStrategy[Packet]:
    """Packets a well-behaved client may send once connected (none of them closes)."""
    return st.one_of(
        client_publishes(version),
        subscribes(version),
        unsubscribes(version),
        pingreqs(version),
        _acks(Puback)(version),
        _acks(Pubrec)(version),
        _acks(Pubrel)(version),
        _acks(Pubcomp)(version),
    )
