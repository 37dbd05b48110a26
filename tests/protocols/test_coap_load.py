"""The benchmark's raw CoAP requests are what aiocoap reads (``gateway.coap_bench``)."""

from __future__ import annotations

import pytest
from aiocoap import Message
from aiocoap.numbers.codes import Code
from aiocoap.numbers.types import Type

from gateway.coap_bench import encode_post


@pytest.mark.parametrize("device", ["d", "dev-12-3", "a-device-name-longer-than-13-bytes"])
def test_encoded_post_decodes(device: str) -> None:
    datagram = encode_post(0xBEEF, b"\x00\x00\x00\x07", ("t", device), b'{"v": 1}')
    message = Message.decode(datagram)
    assert (message.mtype, message.code, message.mid) == (Type.CON, Code.POST, 0xBEEF)
    assert message.token == b"\x00\x00\x00\x07"
    assert message.opt.uri_path == ("t", device)
    assert message.opt.content_format == 50
    assert message.payload == b'{"v": 1}'
