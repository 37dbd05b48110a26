"""The broker's topic tries against the regex reference matcher and the spec's examples.

`SubscriptionTrie.match` and `RetainedTree.matching` must agree exactly with
`compile_topic_filter(f).match(topic)` on filters and topics drawn from a few levels that
exercise every rule ("", "$SYS", "+", "#"); Hypothesis state machines compare add/remove
churn with a dict and check that pruning leaves exactly one node per stored prefix. The
explicit examples are those of MQTT 3.1.1 / 5.0 section 4.7, with the statement they check.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from protocols.mqtt.topics import compile_topic_filter
from protocols.mqtt.trie import RetainedTree, SubscriptionTrie, topic_filter_levels

# Levels that hit every rule: empty levels, $-topics at the first level and deeper, "$"
# alone, a level that only starts like one of the others.
NAME_LEVELS = ("", "a", "b", "$SYS", "$", "a$")
topic_names = (
    st.lists(st.sampled_from(NAME_LEVELS), min_size=1, max_size=5).map("/".join).filter(bool)
)


@st.composite
def topic_filters(draw: st.DrawFn) -> str:
    levels = draw(st.lists(st.sampled_from((*NAME_LEVELS, "+")), max_size=4))
    if draw(st.booleans()):
        levels.append("#")
    return "/".join(levels) or "#"


def reference_matches(topic_filter: str, topic: str) -> bool:
    return compile_topic_filter(topic_filter).match(topic) is not None


def subscriptions_matching(trie: SubscriptionTrie[Any, Any], topic: str) -> Counter[Any]:
    return Counter(trie.match(topic))


# --- Agreement with the reference matcher -------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    subscriptions=st.lists(st.tuples(topic_filters(), st.integers(0, 3)), max_size=25),
    topics=st.lists(topic_names, min_size=1, max_size=10),
)
def test_match_agrees_with_the_reference_matcher(
    subscriptions: list[tuple[str, int]], topics: list[str]
) -> None:
    trie: SubscriptionTrie[int, str] = SubscriptionTrie()
    stored: dict[tuple[str, int], str] = {}
    for topic_filter, key in subscriptions:
        trie.add(topic_filter, key, f"{key}@{topic_filter}")
        stored[topic_filter, key] = f"{key}@{topic_filter}"
    assert len(trie) == len(stored)
    for topic in topics:
        expected = Counter(
            (key, value, topic_filter)
            for (topic_filter, key), value in stored.items()
            if reference_matches(topic_filter, topic)
        )
        assert subscriptions_matching(trie, topic) == expected, topic


@settings(max_examples=300, deadline=None)
@given(
    topics=st.lists(topic_names, max_size=25),
    filters=st.lists(topic_filters(), min_size=1, max_size=10),
)
def test_retained_matching_agrees_with_the_reference_matcher(
    topics: list[str], filters: list[str]
) -> None:
    tree: RetainedTree[str] = RetainedTree()
    for topic in topics:
        tree.set(topic, topic.upper())
    assert len(tree) == len(set(topics))
    for topic_filter in filters:
        expected = sorted(
            (topic, topic.upper()) for topic in set(topics)
            if reference_matches(topic_filter, topic)
        )
        assert sorted(tree.matching(topic_filter)) == expected, topic_filter


@settings(max_examples=200, deadline=None)
@given(topic_filter=st.text(st.sampled_from("ab/+#$\x00"), max_size=8))
def test_validation_agrees_with_the_reference_matcher(topic_filter: str) -> None:
    """The reference does not check for U+0000 [MQTT-4.7.3-2]; otherwise, the same
    filters are refused."""
    try:
        compile_topic_filter(topic_filter)
        reference_valid = "\x00" not in topic_filter
    except ValueError:
        reference_valid = False
    try:
        topic_filter_levels(topic_filter)
        valid = True
    except ValueError as error:
        assert str(error).startswith("invalid topic filter")
        valid = False
    assert valid is reference_valid


# --- Churn, against a dict, with pruning checked after every step --------------------------


def prefixes(paths: set[str]) -> set[tuple[str, ...]]:
    """Every level prefix of the paths, the empty one (the root) included."""
    result: set[tuple[str, ...]] = {()}
    for path in paths:
        levels = tuple(path.split("/"))
        result.update(levels[:depth] for depth in range(1, len(levels) + 1))
    return result


def subscription_nodes(trie: SubscriptionTrie[Any, Any]) -> int:
    count, stack = 0, [trie._root]
    while stack:
        node = stack.pop()
        count += 1
        assert node.subscribers is None or node.subscribers  # no empty dict left behind
        assert node.children is None or node.children
        stack.extend(node.children.values() if node.children else ())
        stack.extend(child for child in (node.plus, node.hash) if child is not None)
    return count


def retained_nodes(tree: RetainedTree[Any]) -> int:
    count, stack = 0, [tree._root]
    while stack:
        node = stack.pop()
        count += 1
        assert node.children is None or node.children
        stack.extend(node.children.values() if node.children else ())
    return count


class SubscriptionChurn(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.trie: SubscriptionTrie[int, int] = SubscriptionTrie()
        self.model: dict[tuple[str, int], int] = {}

    @rule(topic_filter=topic_filters(), key=st.integers(0, 3), value=st.integers())
    def add(self, topic_filter: str, key: int, value: int) -> None:
        is_new = (topic_filter, key) not in self.model
        assert self.trie.add(topic_filter, key, value) is is_new
        self.model[topic_filter, key] = value

    @rule(topic_filter=topic_filters(), key=st.integers(0, 3))
    def remove(self, topic_filter: str, key: int) -> None:
        present = self.model.pop((topic_filter, key), None) is not None
        assert self.trie.remove(topic_filter, key) is present
        assert self.trie.get(topic_filter, key) is None

    @rule(data=st.data())
    def remove_existing(self, data: st.DataObject) -> None:
        if self.model:
            topic_filter, key = data.draw(st.sampled_from(sorted(self.model)))
            assert self.trie.remove(topic_filter, key)
            del self.model[topic_filter, key]

    @rule(topic_filter=topic_filters(), key=st.integers(0, 3))
    def get(self, topic_filter: str, key: int) -> None:
        assert self.trie.get(topic_filter, key) == self.model.get((topic_filter, key))

    @rule(topic=topic_names)
    def match(self, topic: str) -> None:
        expected = Counter(
            (key, value, topic_filter)
            for (topic_filter, key), value in self.model.items()
            if reference_matches(topic_filter, topic)
        )
        assert subscriptions_matching(self.trie, topic) == expected

    @invariant()
    def pruned(self) -> None:
        assert len(self.trie) == len(self.model)
        stored = {topic_filter for topic_filter, _ in self.model}
        assert subscription_nodes(self.trie) == len(prefixes(stored))

    def teardown(self) -> None:
        for topic_filter, key in list(self.model):
            assert self.trie.remove(topic_filter, key)
        assert len(self.trie) == 0
        assert self.trie._root.is_empty()
        assert subscription_nodes(self.trie) == 1


class RetainedChurn(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.tree: RetainedTree[int] = RetainedTree()
        self.model: dict[str, int] = {}

    @rule(topic=topic_names, value=st.integers())
    def set(self, topic: str, value: int) -> None:
        assert self.tree.set(topic, value) is (topic not in self.model)
        self.model[topic] = value

    @rule(topic=topic_names)
    def delete(self, topic: str) -> None:
        assert self.tree.delete(topic) is (self.model.pop(topic, None) is not None)

    @rule(data=st.data())
    def delete_existing(self, data: st.DataObject) -> None:
        if self.model:
            topic = data.draw(st.sampled_from(sorted(self.model)))
            assert self.tree.delete(topic)
            del self.model[topic]

    @rule(topic=topic_names)
    def get(self, topic: str) -> None:
        assert self.tree.get(topic) == self.model.get(topic)

    @rule(topic_filter=topic_filters())
    def matching(self, topic_filter: str) -> None:
        expected = sorted(
            (topic, value) for topic, value in self.model.items()
            if reference_matches(topic_filter, topic)
        )
        assert sorted(self.tree.matching(topic_filter)) == expected

    @invariant()
    def pruned(self) -> None:
        assert len(self.tree) == len(self.model)
        assert retained_nodes(self.tree) == len(prefixes(set(self.model)))

    def teardown(self) -> None:
        for topic in list(self.model):
            assert self.tree.delete(topic)
        assert len(self.tree) == 0
        assert self.tree._root.children is None
        assert self.tree._root.entry is None


TestSubscriptionChurn = SubscriptionChurn.TestCase
TestSubscriptionChurn.settings = settings(max_examples=100, stateful_step_count=40,
                                          deadline=None)
TestRetainedChurn = RetainedChurn.TestCase
TestRetainedChurn.settings = settings(max_examples=100, stateful_step_count=40, deadline=None)


def test_churn_on_one_deep_filter_frees_every_node() -> None:
    trie: SubscriptionTrie[str, int] = SubscriptionTrie()
    for round_number in range(3):
        for client in range(100):
            trie.add(f"tenants/t{client}/devices/+/telemetry/#", f"c{client}", round_number)
        assert subscription_nodes(trie) == 1 + 1 + 100 * 5
        for client in range(100):
            assert trie.remove(f"tenants/t{client}/devices/+/telemetry/#", f"c{client}")
        assert len(trie) == 0
        assert subscription_nodes(trie) == 1


# --- The examples of section 4.7 --------------------------------------------------------


def subscribed(*filters: str) -> SubscriptionTrie[str, None]:
    trie: SubscriptionTrie[str, None] = SubscriptionTrie()
    for topic_filter in filters:
        trie.add(topic_filter, topic_filter, None)
    return trie


def matched_filters(trie: SubscriptionTrie[str, None], topic: str) -> set[str]:
    return {topic_filter for _, _, topic_filter in trie.match(topic)}


def retained(*topics: str) -> RetainedTree[int]:
    tree: RetainedTree[int] = RetainedTree()
    for index, topic in enumerate(topics):
        tree.set(topic, index)
    return tree


def retained_topics(tree: RetainedTree[int], topic_filter: str) -> set[str]:
    return {topic for topic, _ in tree.matching(topic_filter)}


def test_multi_level_wildcard_matches_the_parent_and_every_child() -> None:
    """4.7.1.2: 'if a client subscribes to "sport/tennis/player1/#", it would receive
    messages published using these topic names: "sport/tennis/player1",
    "sport/tennis/player1/ranking", "sport/tennis/player1/score/wimbledon"', and
    '"sport/#" also matches the singular "sport"'."""
    trie = subscribed("sport/tennis/player1/#", "sport/#")
    for topic in ("sport/tennis/player1", "sport/tennis/player1/ranking",
                  "sport/tennis/player1/score/wimbledon"):
        assert matched_filters(trie, topic) == {"sport/tennis/player1/#", "sport/#"}
    assert matched_filters(trie, "sport") == {"sport/#"}
    assert matched_filters(trie, "sport/tennis/player2") == {"sport/#"}
    assert matched_filters(trie, "sports") == set()

    tree = retained("sport", "sport/tennis/player1", "sport/tennis/player1/ranking",
                    "sport/tennis/player1/score/wimbledon", "sport/tennis/player2", "sports")
    assert retained_topics(tree, "sport/tennis/player1/#") == {
        "sport/tennis/player1", "sport/tennis/player1/ranking",
        "sport/tennis/player1/score/wimbledon"}
    assert retained_topics(tree, "sport/#") == retained_topics(tree, "#") - {"sports"}


def test_single_level_wildcard_matches_exactly_one_level() -> None:
    """4.7.1.3: '"sport/tennis/+" matches "sport/tennis/player1" and
    "sport/tennis/player2", but not "sport/tennis/player1/ranking"'; '"sport/+" does not
    match "sport" but it does match "sport/"'; '"+/+" and "/+" match "/finance"; "+" does
    not'."""
    trie = subscribed("sport/tennis/+", "sport/+", "+/+", "/+", "+")
    assert matched_filters(trie, "sport/tennis/player1") == {"sport/tennis/+"}
    assert matched_filters(trie, "sport/tennis/player2") == {"sport/tennis/+"}
    assert matched_filters(trie, "sport/tennis/player1/ranking") == set()
    assert matched_filters(trie, "sport") == {"+"}
    assert matched_filters(trie, "sport/") == {"sport/+", "+/+"}  # + matches an empty level
    assert matched_filters(trie, "/finance") == {"+/+", "/+"}

    tree = retained("sport", "sport/", "sport/tennis", "/finance", "sport/tennis/player1")
    assert retained_topics(tree, "sport/+") == {"sport/", "sport/tennis"}
    assert retained_topics(tree, "+") == {"sport"}
    assert retained_topics(tree, "+/+") == {"sport/", "sport/tennis", "/finance"}
    assert retained_topics(tree, "/+") == {"/finance"}


def test_dollar_topics_do_not_match_leading_wildcards() -> None:
    """[MQTT-4.7.2-1] 'The Server MUST NOT match Topic Filters starting with a wildcard
    character (# or +) with Topic Names beginning with a $ character'; 4.7.2: "#" does not
    receive "$SYS/..." messages, "+/monitor/Clients" does not receive
    "$SYS/monitor/Clients", "$SYS/#" and "$SYS/monitor/+" do."""
    trie = subscribed("#", "+/monitor/Clients", "$SYS/#", "$SYS/monitor/+", "+/#", "+")
    assert matched_filters(trie, "$SYS/monitor/Clients") == {"$SYS/#", "$SYS/monitor/+"}
    assert matched_filters(trie, "$SYS") == {"$SYS/#"}
    assert matched_filters(trie, "SYS/monitor/Clients") == {"#", "+/monitor/Clients", "+/#"}
    # Only the first level counts: "$" deeper down is an ordinary character.
    assert matched_filters(trie, "a/$SYS") == {"#", "+/#"}

    tree = retained("$SYS/monitor/Clients", "$SYS", "SYS/monitor/Clients", "a/$SYS")
    assert retained_topics(tree, "#") == {"SYS/monitor/Clients", "a/$SYS"}
    assert retained_topics(tree, "+/monitor/Clients") == {"SYS/monitor/Clients"}
    assert retained_topics(tree, "+") == set()
    assert retained_topics(tree, "$SYS/#") == {"$SYS/monitor/Clients", "$SYS"}
    assert retained_topics(tree, "$SYS/monitor/+") == {"$SYS/monitor/Clients"}
    assert retained_topics(tree, "a/+") == {"a/$SYS"}


@pytest.mark.parametrize(("topic_filter", "reason"), [
    ("", "empty"),  # [MQTT-4.7.3-1] at least one character long
    ("a/\x00", r"U\+0000"),  # [MQTT-4.7.3-2] no null character
    ("sport/tennis/#/ranking", "'#' must be the last level"),  # [MQTT-4.7.1-2] 4.7.1.2
    ("sport/tennis#", "a wildcard must be a whole level"),  # [MQTT-4.7.1-2] 4.7.1.2
    ("#/", "'#' must be the last level"),
    ("sport+", "a wildcard must be a whole level"),  # [MQTT-4.7.1-3] 4.7.1.3
    ("sport/+tennis", "a wildcard must be a whole level"),  # [MQTT-4.7.1-3]
    ("a/++", "a wildcard must be a whole level"),
])
def test_invalid_filters_are_refused_by_every_operation(topic_filter: str, reason: str) -> None:
    trie: SubscriptionTrie[str, int] = SubscriptionTrie()
    tree: RetainedTree[int] = RetainedTree()
    operations = (lambda: trie.add(topic_filter, "c", 1), lambda: trie.remove(topic_filter, "c"),
                  lambda: trie.get(topic_filter, "c"), lambda: tree.matching(topic_filter))
    for operation in operations:
        with pytest.raises(ValueError, match=f"invalid topic filter .*{reason}"):
            operation()
    assert len(trie) == 0


@pytest.mark.parametrize("topic_filter", [
    "#", "+", "sport/#", "+/tennis/#", "sport/+/player1", "/", "//", "+/+", "$SYS/#",
])  # 4.7.1.2 and 4.7.1.3: the filters the spec calls valid
def test_valid_filters_are_accepted(topic_filter: str) -> None:
    trie: SubscriptionTrie[str, int] = SubscriptionTrie()
    assert trie.add(topic_filter, "c", 1)
    assert trie.get(topic_filter, "c") == 1


@pytest.mark.parametrize("topic", ["", "a/+", "a/#", "a\x00"])
def test_retained_topics_must_be_topic_names(topic: str) -> None:
    """[MQTT-4.7.1-1] (3.1.1) wildcards 'MUST NOT be used within a Topic Name'; [MQTT-4.7.3-1],
    [MQTT-4.7.3-2]."""
    tree: RetainedTree[int] = RetainedTree()
    with pytest.raises(ValueError, match="invalid topic name"):
        tree.set(topic, 1)
    assert len(tree) == 0


# --- The rest of the API -----------------------------------------------------------------


def test_add_replaces_the_value_of_the_same_key_and_filter() -> None:
    trie: SubscriptionTrie[str, int] = SubscriptionTrie()
    assert trie.add("a/+", "c1", 0)
    assert trie.match("a/b") == [("c1", 0, "a/+")]
    assert not trie.add("a/+", "c1", 1)  # e.g. a SUBSCRIBE again with another QoS
    assert len(trie) == 1
    assert trie.get("a/+", "c1") == 1
    assert trie.match("a/b") == [("c1", 1, "a/+")]
    assert trie.get("a/+", "c2") is None
    assert trie.get("a/b", "c1") is None  # get is by filter, it does not match


def test_overlapping_filters_of_one_key_yield_one_entry_each() -> None:
    """The broker merges them, 4.7.1.x / 3.3.4: 'the Server MUST deliver the message to the
    Client respecting the maximum QoS of all the matching subscriptions'."""
    trie: SubscriptionTrie[str, int] = SubscriptionTrie()
    for qos, topic_filter in enumerate(("a/b", "a/+", "#")):
        trie.add(topic_filter, "c1", qos)
    trie.add("a/b", "c2", 2)
    assert sorted(trie.match("a/b")) == [
        ("c1", 0, "a/b"), ("c1", 1, "a/+"), ("c1", 2, "#"), ("c2", 2, "a/b")]
    assert trie.remove("a/+", "c1")
    assert not trie.remove("a/+", "c1")
    assert not trie.remove("a/b/c", "c1")
    assert sorted(trie.match("a/b")) == [("c1", 0, "a/b"), ("c1", 2, "#"), ("c2", 2, "a/b")]


def test_match_results_belong_to_the_caller() -> None:
    trie: SubscriptionTrie[str, int] = SubscriptionTrie()
    trie.add("a/#", "c1", 1)
    first = trie.match("a/b")
    first.clear()
    assert trie.match("a/b") == [("c1", 1, "a/#")]
    tree = retained("a/b")
    found = tree.matching("a/#")
    found.clear()
    assert tree.matching("a/#") == [("a/b", 0)]


def test_retained_values_are_replaced_and_deleted() -> None:
    tree: RetainedTree[bytes] = RetainedTree()
    assert tree.set("a/b", b"1")
    assert not tree.set("a/b", b"2")
    assert tree.set("a", b"parent")
    assert len(tree) == 2
    assert tree.get("a/b") == b"2"
    assert tree.get("a/b/c") is None
    assert tree.get("a/c") is None
    assert tree.delete("a")
    assert not tree.delete("a")  # the node stays for "a/b", without a value
    assert tree.get("a") is None
    assert tree.matching("a/#") == [("a/b", b"2")]
    assert tree.delete("a/b")
    assert not tree.delete("a/b/c")
    assert len(tree) == 0
    assert tree._root.children is None
