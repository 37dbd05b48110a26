"""Topic tries for the broker: who is subscribed to a topic, which retained messages a new
subscription receives. Pure data structures, no I/O.

Theory of operation
-------------------
Both trees are keyed by topic level (the text between ``/``). A filter or topic of n levels
is the node at depth n; every node knows its depth, so a walk needs one stack of nodes and
no per-step tuples, and the cost of a lookup follows the depth of the topic and the number
of nodes that can match, never the number of entries stored.

`SubscriptionTrie` stores filters. Besides its literal children a node has two special
children, ``plus`` (the ``+`` level) and ``hash`` (the ``#`` level, always a leaf). Matching
a topic name walks, at each level, the literal child of that name and the ``+`` child, and
collects the ``#`` child of every node it visits: ``#`` matches the rest of the topic,
including nothing at all, which is why ``a/#`` matches ``a`` (MQTT 5.0 section 4.7.1.2).

`RetainedTree` stores topic names. Matching a filter walks the other way: a literal level
follows one child, ``+`` follows all of them, ``#`` collects the whole subtree including the
node itself.

In both, wildcards at the first level never meet a topic whose first level starts with
``$`` [MQTT-4.7.2-1], and removals prune nodes left empty, so churn does not grow memory.

Results are built from tuples kept on the nodes, so a match allocates its result list and
its stack, not a tuple per entry; later results may hold the same tuple objects. A
subscription node rebuilds its tuples on the first match after a change, so a run of
SUBSCRIBEs to one hot filter costs O(1) each.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Generic, TypeVar

__all__ = ["RetainedTree", "SubscriptionTrie", "topic_filter_levels"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


def topic_filter_levels(topic_filter: str) -> list[str]:
    """The levels of a valid topic filter; ValueError naming what is wrong otherwise.

    The rules of section 4.7, numbered as in MQTT 3.1.1: not empty [MQTT-4.7.3-1], no
    U+0000 [MQTT-4.7.3-2], ``#`` a whole level and the last one [MQTT-4.7.1-2], ``+`` a whole
    level [MQTT-4.7.1-3]. (MQTT 5.0 numbers the wildcard rules 4.7.1-1 and 4.7.1-2.)
    """
    if not topic_filter:
        raise ValueError("invalid topic filter '': empty")
    if "\x00" in topic_filter:
        raise ValueError(f"invalid topic filter {topic_filter!r}: contains U+0000")
    levels = topic_filter.split("/")
    if "+" in topic_filter or "#" in topic_filter:
        last = len(levels) - 1
        for index, level in enumerate(levels):
            if level == "#":
                if index != last:
                    raise ValueError(
                        f"invalid topic filter {topic_filter!r}: '#' must be the last level"
                    )
            elif level != "+" and ("+" in level or "#" in level):
                raise ValueError(
                    f"invalid topic filter {topic_filter!r}: a wildcard must be a whole "
                    f"level, not {level!r}"
                )
    return levels


def _check_topic_name(topic: str) -> None:
    if not topic:
        raise ValueError("invalid topic name '': empty")
    if "+" in topic or "#" in topic or "\x00" in topic:
        raise ValueError(f"invalid topic name {topic!r}: contains a wildcard or U+0000")


class _SubscriptionNode(Generic[K, V]):
    __slots__ = ("children", "depth", "entries", "hash", "plus", "subscribers", "topic_filter")

    def __init__(self, depth: int) -> None:
        self.depth = depth
        self.children: dict[str, _SubscriptionNode[K, V]] | None = None
        self.plus: _SubscriptionNode[K, V] | None = None
        self.hash: _SubscriptionNode[K, V] | None = None
        self.subscribers: dict[K, V] | None = None
        self.topic_filter = ""  # set while the node has subscribers
        self.entries: list[tuple[K, V, str]] | None = None  # cache of subscribers, for match

    def is_empty(self) -> bool:
        return not (self.subscribers or self.children or self.plus or self.hash)


def _entries(node: _SubscriptionNode[K, V]) -> list[tuple[K, V, str]]:
    """Rebuilds the cache of (key, value, filter) of a node that has subscribers."""
    assert node.subscribers is not None
    topic_filter = node.topic_filter
    entries = node.entries = [(key, value, topic_filter) for key, value in
                              node.subscribers.items()]
    return entries


class SubscriptionTrie(Generic[K, V]):
    """Subscriptions by topic filter: one value per (filter, key), e.g. key a client id,
    value its subscription options. `match` finds every subscription a topic name meets."""

    __slots__ = ("_count", "_root")

    def __init__(self) -> None:
        self._root: _SubscriptionNode[K, V] = _SubscriptionNode(0)
        self._count = 0

    def __len__(self) -> int:
        """The number of (filter, key) entries."""
        return self._count

    def add(self, topic_filter: str, key: K, value: V) -> bool:
        """Stores `value` for `key` under `topic_filter`: True if the pair is new, False if it
        replaced the value `key` had for that same filter. ValueError if the filter is not
        valid."""
        node = self._root
        for level in topic_filter_levels(topic_filter):
            if level == "+":
                child = node.plus
                if child is None:
                    child = node.plus = _SubscriptionNode(node.depth + 1)
            elif level == "#":
                child = node.hash
                if child is None:
                    child = node.hash = _SubscriptionNode(node.depth + 1)
            else:
                children = node.children
                if children is None:
                    children = node.children = {}
                child = children.get(level)
                if child is None:
                    child = children[level] = _SubscriptionNode(node.depth + 1)
            node = child
        subscribers = node.subscribers
        if subscribers is None:
            subscribers = node.subscribers = {}
            node.topic_filter = topic_filter
        node.entries = None
        is_new = key not in subscribers
        subscribers[key] = value
        self._count += is_new
        return is_new

    def remove(self, topic_filter: str, key: K) -> bool:
        """Removes the subscription of `key` to `topic_filter`: False if there was none.
        ValueError if the filter is not valid."""
        levels = topic_filter_levels(topic_filter)
        path = [self._root]
        node: _SubscriptionNode[K, V] | None = self._root
        for level in levels:
            node = _child(path[-1], level)
            if node is None:
                return False
            path.append(node)
        assert node is not None
        subscribers = node.subscribers
        if subscribers is None or key not in subscribers:
            return False
        del subscribers[key]
        node.entries = None
        self._count -= 1
        if not subscribers:
            node.subscribers = None
            node.topic_filter = ""
            # Prune from the leaf up, while nodes are left with nothing.
            for depth in range(len(levels), 0, -1):
                if not path[depth].is_empty():
                    break
                parent, level = path[depth - 1], levels[depth - 1]
                if level == "+":
                    parent.plus = None
                elif level == "#":
                    parent.hash = None
                else:
                    assert parent.children is not None
                    del parent.children[level]
                    if not parent.children:
                        parent.children = None
        return True

    def get(self, topic_filter: str, key: K) -> V | None:
        """The value `key` has under `topic_filter`, None if it has no such subscription.
        ValueError if the filter is not valid."""
        node: _SubscriptionNode[K, V] | None = self._root
        for level in topic_filter_levels(topic_filter):
            assert node is not None
            node = _child(node, level)
            if node is None:
                return None
        assert node is not None
        if node.subscribers is None:
            return None
        return node.subscribers.get(key)

    def match(self, topic: str) -> list[tuple[K, V, str]]:
        """(key, value, filter) of every subscription whose filter matches the topic name
        `topic`, which must be valid (non-empty, no wildcards), as the codec ensures. A key
        subscribed with several matching filters appears once per filter; the order is
        unspecified."""
        levels = topic.split("/")
        last = len(levels)
        result: list[tuple[K, V, str]] = []
        root = self._root
        stack: list[_SubscriptionNode[K, V]] = []
        children = root.children
        if children is not None:
            child = children.get(levels[0])
            if child is not None:
                stack.append(child)
        if topic[:1] != "$":  # [MQTT-4.7.2-1]: no leading wildcard matches a $-topic
            node = root.hash
            if node is not None:
                result += node.entries or _entries(node)
            node = root.plus
            if node is not None:
                stack.append(node)
        pop = stack.pop
        push = stack.append
        while stack:
            node = pop()
            hash_node = node.hash
            if hash_node is not None:
                result += hash_node.entries or _entries(hash_node)
            depth = node.depth
            if depth == last:
                if node.subscribers:
                    result += node.entries or _entries(node)
                continue
            children = node.children
            if children is not None:
                child = children.get(levels[depth])
                if child is not None:
                    push(child)
            child = node.plus
            if child is not None:
                push(child)
        return result


def _child(node: _SubscriptionNode[K, V], level: str) -> _SubscriptionNode[K, V] | None:
    if level == "+":
        return node.plus
    if level == "#":
        return node.hash
    return node.children.get(level) if node.children is not None else None


class _RetainedNode(Generic[V]):
    __slots__ = ("children", "depth", "entry")

    def __init__(self, depth: int) -> None:
        self.depth = depth
        self.children: dict[str, _RetainedNode[V]] | None = None
        self.entry: tuple[str, V] | None = None  # (topic, value) if a message is retained here


class RetainedTree(Generic[V]):
    """Retained messages by topic name; `matching` finds those a new subscription gets."""

    __slots__ = ("_count", "_root")

    def __init__(self) -> None:
        self._root: _RetainedNode[V] = _RetainedNode(0)
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def set(self, topic: str, value: V) -> bool:
        """Retains `value` for `topic` (a topic name, no wildcards): True if the topic had no
        retained value, False if this one replaced it. ValueError for an invalid name."""
        _check_topic_name(topic)
        node = self._root
        for level in topic.split("/"):
            children = node.children
            if children is None:
                children = node.children = {}
            child = children.get(level)
            if child is None:
                child = children[level] = _RetainedNode(node.depth + 1)
            node = child
        is_new = node.entry is None
        node.entry = (topic, value)
        self._count += is_new
        return is_new

    def items(self) -> list[tuple[str, V]]:
        """Every retained (topic, value), ``$`` topics included (to save them)."""
        result: list[tuple[str, V]] = []
        _collect(self._root, result)
        return result

    def get(self, topic: str) -> V | None:
        """The value retained for `topic`, None if there is none."""
        node = self._root
        for level in topic.split("/"):
            children = node.children
            if children is None:
                return None
            child = children.get(level)
            if child is None:
                return None
            node = child
        return node.entry[1] if node.entry is not None else None

    def delete(self, topic: str) -> bool:
        """Forgets the value retained for `topic`: False if there was none."""
        levels = topic.split("/")
        path = [self._root]
        for level in levels:
            children = path[-1].children
            child = children.get(level) if children is not None else None
            if child is None:
                return False
            path.append(child)
        if path[-1].entry is None:
            return False
        path[-1].entry = None
        self._count -= 1
        for depth in range(len(levels), 0, -1):
            node = path[depth]
            if node.entry is not None or node.children:
                break
            parent_children = path[depth - 1].children
            assert parent_children is not None
            del parent_children[levels[depth - 1]]
            if not parent_children:
                path[depth - 1].children = None
        return True

    def matching(self, topic_filter: str) -> list[tuple[str, V]]:
        """(topic, value) of every retained message whose topic `topic_filter` matches,
        visiting only the branches the filter can reach; the order is unspecified.
        ValueError if the filter is not valid."""
        levels = topic_filter_levels(topic_filter)
        last = len(levels)
        result: list[tuple[str, V]] = []
        stack = [self._root]
        pop = stack.pop
        push = stack.append
        while stack:
            node = pop()
            depth = node.depth
            if depth == last:
                if node.entry is not None:
                    result.append(node.entry)
                continue
            children = node.children
            level = levels[depth]
            if level == "#":
                if node.entry is not None:  # "a/#" matches "a" too
                    result.append(node.entry)
                if children is not None:
                    for name, child in children.items():
                        if depth or name[:1] != "$":  # [MQTT-4.7.2-1]
                            _collect(child, result)
            elif children is None:
                continue
            elif level == "+":
                for name, child in children.items():
                    if depth or name[:1] != "$":  # [MQTT-4.7.2-1]
                        push(child)
            else:
                found = children.get(level)
                if found is not None:
                    push(found)
        return result


def _collect(node: _RetainedNode[V], result: list[tuple[str, V]]) -> None:
    """Appends every entry of the subtree under `node`, `node` included."""
    stack = [node]
    pop = stack.pop
    extend = stack.extend
    while stack:
        node = pop()
        if node.entry is not None:
            result.append(node.entry)
        if node.children is not None:
            extend(node.children.values())
