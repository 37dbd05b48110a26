"""Config: typed, strict, and every error names its place."""

from __future__ import annotations

import pytest

from gateway.config import default_config_path, load_config, parse_config, split_host_port
from gateway.errors import ConfigError

TIER = '[[tiers]]\nname = "standard"\nmax_latency_ms = 100\n'


def test_the_default_config_loads() -> None:
    config = load_config()
    assert config.tier_names == ["critical", "premium", "standard", "bulk"]
    # The built-in config lets anyone connect, so it listens on loopback only.
    assert config.mqtt.listen == "127.0.0.1:1883" and config.auth.allow_anonymous
    assert config.admin.listen == "127.0.0.1:9883"
    assert default_config_path().name == "gateway.toml"


@pytest.mark.parametrize(("toml", "message"), [
    ("", "at least one tier is required"),
    ('[[tiers]]\nname = "a"\nmax_latency_ms = 0\n', "tiers[0].max_latency_ms: expected"),
    (TIER + TIER, "tier names must be unique"),
    (TIER + '[[tiers]]\nname = "b"\nmax_latency_ms = 1\nguaranteed_share = 0.7\n'
     '[[tiers]]\nname = "c"\nmax_latency_ms = 1\nguaranteed_share = 0.7\n', "add up to more"),
    (TIER + '[classify]\ndefault_tier = "gold"\n', "default_tier 'gold' is not a tier"),
    (TIER + '[[classify.rules]]\nmatch = {}\ntier = "gold"\n', "classify.rules[0].tier"),
    (TIER + '[[pipelines]]\nname = "p"\nstages = []\ntiers = ["gold"]\n', "pipelines[0].tiers"),
    (TIER + '[dispatch]\nmax_queued = 10\nresume_queued = 10\n', "resume_queued"),
    (TIER + '[mqtt]\nlisten = "nowhere"\n', "expected HOST:PORT"),
    (TIER + '[admin]\nlisten = "1.2.3.4:99999"\n', "expected HOST:PORT"),
    (TIER + '[mqtt]\nreceive_maximum = 0\n', "mqtt.receive_maximum: expected `int` >= 1"),
    (TIER + "[gateway]\nnode_id = \"has space\"\n", "gateway.node_id"),
    (TIER + "[gateway]\nextra = 1\n", "unknown field `extra`"),
    (TIER + '[[classify.rules]]\nmatch = { payload = {} }\n',
     "classify.rules[0].match.payload: give at least one field"),
    (TIER + '[[classify.rules]]\nmatch = { topic = "a/#/b" }\n',
     "classify.rules[0].match: invalid topic filter 'a/#/b'"),
])
def test_errors_name_their_place(toml: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(toml, "test.toml")
    assert message in str(err.value)
    assert str(err.value).startswith("test.toml: ")


def test_unreadable_file(tmp_path: pytest.TempPathFactory) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config("/nonexistent/gateway.toml")


@pytest.mark.parametrize(("value", "expected"), [
    ("127.0.0.1:1883", ("127.0.0.1", 1883)),
    (":1883", ("0.0.0.0", 1883)),
    ("[::1]:0", ("::1", 0)),
    ("localhost:9883", ("localhost", 9883)),
])
def test_host_port(value: str, expected: tuple[str, int]) -> None:
    assert split_host_port(value) == expected
