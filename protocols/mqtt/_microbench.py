"""Ingest microbenchmark of the MQTT codec: `uv run python -m protocols.mqtt._microbench`.

Feeds 64 KiB chunks of 100-byte (or `--frame-size`) PUBLISH frames, which straddle chunk
boundaries as they do off a socket, into `ServerConnection.receive_data` and prints Publish
events per second, for QoS 0 and QoS 1 in both protocol versions. The peer measured in the
same run is the generic `decode()` on the same bytes, packet by packet: the ratio shows what
the inline hot path buys. Single core, no I/O.
"""

import argparse
import math
import time
from collections.abc import Callable
from functools import partial

from .connection import ServerConnection
from .packets import MQTT_3_1_1, MQTT_5, Connect, Publish, decode, encode

CHUNK_SIZE = 64 * 1024
FRAME_SIZE = 100
TOPIC = "devices/dev-123/telemetry"


def _frame(version: int, qos: int, sequence: int, frame_size: int) -> bytes:
    """One PUBLISH of exactly `frame_size` bytes with a JSON payload."""
    packet_id = sequence % 65535 + 1 if qos else None
    empty = encode(Publish(TOPIC, b"", qos, packet_id=packet_id), version)
    body = f'{{"seq":{sequence},"temp":21.5,"hum":40.25,"bat":3.71,"pad":"'.encode()
    filler = frame_size - len(empty) - len(body) - 2
    if frame_size > 129:  # the remaining length takes a second byte
        filler -= 1
    payload = body + b"x" * filler + b'"}'
    frame = encode(Publish(TOPIC, payload, qos, packet_id=packet_id), version)
    assert len(frame) == frame_size, len(frame)
    return frame


def _chunks(version: int, qos: int, frame_size: int) -> list[bytes]:
    """Consecutive 64 KiB slices of a stream of frames that ends on a frame boundary, so
    that the list can be replayed in a loop."""
    count = frame_size // math.gcd(CHUNK_SIZE, frame_size)  # count * CHUNK_SIZE % frame_size == 0
    frames_needed = count * CHUNK_SIZE // frame_size
    stream = b"".join(
        _frame(version, qos, sequence, frame_size) for sequence in range(frames_needed)
    )
    return [stream[i * CHUNK_SIZE : (i + 1) * CHUNK_SIZE] for i in range(count)]


def _connected(version: int) -> ServerConnection:
    connection = ServerConnection(receive_maximum=65535)
    connection.receive_data(encode(Connect(version, "bench", keepalive=60), version), 0.0)
    connection.accept()
    connection.data_to_send()
    return connection


def measure_connection(
    version: int, qos: int, seconds: float, frame_size: int = FRAME_SIZE
) -> tuple[float, float]:
    """(Publish events per second in receive_data, the same including ack() for QoS 1)."""
    chunks = _chunks(version, qos, frame_size)
    connection = _connected(version)
    events_total = 0
    receive_time = 0.0
    ack_time = 0.0
    clock = time.perf_counter
    deadline = clock() + seconds
    while clock() < deadline:
        for chunk in chunks:
            started = clock()
            events = connection.receive_data(chunk, started)
            receive_time += clock() - started
            events_total += len(events)
            if qos:
                started = clock()
                ack = connection.ack
                for event in events:
                    ack(event)  # type: ignore[arg-type]
                connection.data_to_send()
                ack_time += clock() - started
    assert not connection.closed
    return events_total / receive_time, events_total / (receive_time + ack_time)


def measure_generic_decode(
    version: int, qos: int, seconds: float, frame_size: int = FRAME_SIZE
) -> float:
    """Packets per second through the generic decoder, fed the same chunks."""
    chunks = _chunks(version, qos, frame_size)
    packets = 0
    elapsed = 0.0
    clock = time.perf_counter
    deadline = clock() + seconds
    leftover = b""
    while clock() < deadline:
        for chunk in chunks:
            started = clock()
            view = memoryview(leftover + chunk)
            offset = 0
            while True:
                packet, consumed = decode(view[offset:], version)
                if packet is None:
                    break
                offset += consumed
                packets += 1
            leftover = bytes(view[offset:])
            elapsed += clock() - started
    return packets / elapsed


def _best(measure: Callable[[], float], repeats: int) -> float:
    return max(measure() for _ in range(repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.0, help="per measurement")
    parser.add_argument("--repeats", type=int, default=3, help="best of N")
    parser.add_argument("--frame-size", type=int, default=FRAME_SIZE, help="bytes per PUBLISH")
    arguments = parser.parse_args()
    seconds, repeats, frame_size = arguments.seconds, arguments.repeats, arguments.frame_size
    print(f"{frame_size}-byte PUBLISH frames, topic {TOPIC!r}, {CHUNK_SIZE // 1024} KiB chunks")
    header = ("case", "receive_data/s", "with ack()/s", "generic decode/s", "ratio")
    print(f"{header[0]:<16}{header[1]:>16}{header[2]:>16}{header[3]:>18}{header[4]:>8}")
    for version, name in ((MQTT_3_1_1, "3.1.1"), (MQTT_5, "5.0")):
        for qos in (0, 1):
            runs = [measure_connection(version, qos, seconds, frame_size) for _ in range(repeats)]
            receive_rate = max(run[0] for run in runs)
            with_ack = max(run[1] for run in runs)
            generic = _best(
                partial(measure_generic_decode, version, qos, seconds, frame_size), repeats
            )
            print(
                f"{'MQTT ' + name + f' QoS {qos}':<16}{receive_rate:>16,.0f}"
                f"{(with_ack if qos else receive_rate):>16,.0f}{generic:>18,.0f}"
                f"{receive_rate / generic:>7.1f}x"
            )


if __name__ == "__main__":
    main()
