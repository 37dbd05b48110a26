"""The gateway's exceptions: one root, and the exit code each maps to on the CLI."""


class GatewayError(Exception):
    """Root of every error the gateway raises on purpose."""

    exit_code = 1


class ConfigError(GatewayError):
    """The configuration is invalid; the message names the place."""

    exit_code = 2
