"""Work that may go nowhere now (every region it may be processed in is down), kept in arrival
order and placed again every ``spool_retry_s`` and when a region comes back. Sans-I/O.

QoS >= 1 work is durable already (its write-ahead log record is retired only once it was
processed here or its forward confirmed), so the spool is its in-memory order only; QoS 0 work
is held up to ``max_spooled`` messages, beyond which it is dropped and counted. While work of
a (tenant, device class) waits here, its later messages join the queue behind it even if a
region is up again, so that they never overtake it.
"""

from __future__ import annotations

from collections import deque

from gateway.envelope import Envelope


class Spool:
    def __init__(self, max_qos0: int) -> None:
        self.items: deque[Envelope] = deque()
        self.max_qos0 = max_qos0
        self.qos0 = 0
        self.dropped = 0
        self._keys: dict[tuple[str, str], int] = {}

    def __len__(self) -> int:
        return len(self.items)

    def holds(self, env: Envelope) -> bool:
        """Whether earlier work of ``env``'s (tenant, device class) waits here."""
        return (env.tenant, env.device_class) in self._keys

    def add(self, env: Envelope) -> bool:
        """Keeps ``env``; False: QoS 0 past ``max_qos0``, dropped (counted)."""
        if not env.qos:
            if self.qos0 >= self.max_qos0:
                self.dropped += 1
                return False
            self.qos0 += 1
        self.items.append(env)
        key = (env.tenant, env.device_class)
        self._keys[key] = self._keys.get(key, 0) + 1
        return True

    def take(self, limit: int) -> list[Envelope]:
        """Up to ``limit`` of the oldest, in order, out of the spool; what may still go
        nowhere goes back to the front with ``put_back``."""
        items = self.items
        out = [items.popleft() for _ in range(min(limit, len(items)))]
        keys = self._keys
        for env in out:
            key = (env.tenant, env.device_class)
            n = keys[key] - 1
            if n:
                keys[key] = n
            else:
                del keys[key]
            if not env.qos:
                self.qos0 -= 1
        return out

    def put_back(self, envelopes: list[Envelope]) -> None:
        """Work ``take`` returned that still may go nowhere: ahead of everything left, in
        its order (it is older than all of that)."""
        self.items.extendleft(reversed(envelopes))
        keys = self._keys
        for env in envelopes:
            key = (env.tenant, env.device_class)
            keys[key] = keys.get(key, 0) + 1
            if not env.qos:
                self.qos0 += 1
