"""MQTT topic filters: ``+`` matches one level, ``#`` the rest (and the parent level);
wildcards at the first level never match ``$``-topics such as ``$SYS/...``."""

from __future__ import annotations

import re


def compile_topic_filter(pattern: str) -> re.Pattern[str]:
    """An MQTT topic filter (``+`` one level, ``#`` the rest) as a compiled regex."""
    if not pattern:
        raise ValueError("invalid topic filter '': empty")
    levels = pattern.split("/")
    parts: list[str] = []
    for i, level in enumerate(levels):
        if level == "#":
            if i != len(levels) - 1:
                raise ValueError(f"invalid topic filter {pattern!r}: '#' must be last")
            if not parts:  # wildcards at the first level do not match "$SYS/..." topics
                return re.compile(r"(?!\$).*\Z", re.DOTALL)
            return re.compile("/".join(parts) + r"(?:/.*)?\Z", re.DOTALL)  # "a/#" matches "a"
        if level == "+":
            parts.append("[^/]*" if i else r"(?!\$)[^/]*")
        elif "+" in level or "#" in level:
            raise ValueError(f"invalid topic filter {pattern!r}: a wildcard must be a whole "
                             "level")
        else:
            parts.append(re.escape(level))
    return re.compile("/".join(parts) + r"\Z", re.DOTALL)
