"""The gateway's exceptions: one root, and the exit code each maps to on the CLI."""


class GatewayError(Exception):
    """Root of every error the gateway raises on purpose."""

    exit_code = 1


class ConfigError(GatewayError):
    """The configuration is invalid; the message names the place."""

    exit_code = 2


class WALError(GatewayError):
    """The write-ahead log cannot be used (its directory cannot be created, read or written,
    or it holds a format this version does not know); the message names the path."""
