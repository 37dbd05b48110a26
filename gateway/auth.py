"""Security for the MQTT broker: who a client is, what it may do, and how fast.

Theory of operation
-------------------
Authentication (``Authenticator.authenticate``) runs once per CONNECT:

* A password is checked against the credentials file (``username:<hash>`` lines, scrypt or
  PBKDF2-SHA256, see ``hash_password``). Those hashes are slow on purpose (tens of ms), so
  the check runs in a thread, at most ``max_concurrent_hashes`` at a time; past
  ``max_waiting_hashes`` waiting, a CONNECT is refused with 0x89 (server busy) rather than
  queued without end. An unknown user costs the same hash (against a dummy) as a known one,
  so that timing does not tell which users exist.
* A verified password is remembered as username → HMAC-SHA256(password) under a random
  per-process key, in a bounded table: a reconnect storm of known devices then costs one
  HMAC each instead of one scrypt each. Failures are never remembered. The table is emptied
  whenever the credentials change: the file is stat-ed at most every ``check_interval_s``
  and re-read (in a thread) when it changed; a file that no longer parses is ignored and the
  previous credentials stay.
* A client certificate verified by the TLS listener (``server_ssl_context``) identifies a
  client that sends no user name: its identity (``identity_from_certificate``) is its user
  name. A client that sends a user name is judged by its password, certificate or not.
* Anonymous clients are let in only with ``allow_anonymous``. A user name is refused when no
  credentials file is configured: it would prove nothing, yet choose the tenant.

The result is an ``Identity``: username, client id, tenant (from ``[[auth.users]]``, else
``default_tenant``) and device (the client id, or the certificate identity with
``device_id = "certificate"``).

Authorization (``Acl``): rules are read in order and the first rule that applies to the
client (tenant and device selectors, action) and whose pattern matches the topic decides,
allow or deny. No rule matching means deny; no rules configured at all means everything is
allowed. Patterns are MQTT filters with ``%u`` (username), ``%c`` (client id), ``%t``
(tenant) and ``%d`` (device) filled in per identity; a value that is empty, contains ``+``,
``#``, ``/`` or NUL, or starts with ``$`` could widen a pattern, so an allow rule using it
does not apply to that identity and a deny rule using it denies everything that reaches it.
A subscription is granted only when every topic its filter can match is allowed: an allow
rule decides for a filter that lies entirely inside its pattern, a deny rule as soon as the
filter overlaps its pattern at all. ``$share/<group>/<filter>`` is judged by ``<filter>``.
The patterns are compiled once per identity (``Acl.bind``), and each bound ACL remembers its
recent decisions, so ``can_publish`` on the hot path is usually one dict lookup.

Rate limits: ``TokenBucket.consume`` returns how long to pause reading a client that went
over its messages/s or bytes/s; ``ConnectionFloodGuard`` refuses an address that connects
too often, forgetting addresses that have been quiet for a window.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import hmac
import logging
import math
import os
import re
import secrets
import ssl
import sys
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple, get_args

import click
from msgspec import Meta, Struct

from gateway.errors import ConfigError
from gateway.statedir import write_atomically
from protocols.mqtt.errors import ReasonCode
from protocols.mqtt.topics import compile_topic_filter

log = logging.getLogger(__name__)

Scheme = Literal["scrypt", "pbkdf2-sha256"]
SCHEMES: tuple[str, ...] = get_args(Scheme)
CertificateIdentity = Literal["cn", "san"]

# --------------------------------------------------------------------------- config

PositiveInt = Annotated[int, Meta(ge=1)]
NonNegInt = Annotated[int, Meta(ge=0)]
PositiveFloat = Annotated[float, Meta(gt=0)]
TenantName = Annotated[str, Meta(pattern=r"^[A-Za-z0-9_.-]+$", min_length=1, max_length=64)]


class _Base(Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    pass


class AuthUser(_Base, frozen=True):
    """One ``[[auth.users]]`` entry: the tenant of a user name (or certificate identity)."""

    username: Annotated[str, Meta(min_length=1)]
    tenant: TenantName


class AclRule(_Base, frozen=True):
    """One ``[[auth.acl]]`` rule; rules are read in order and the first that matches decides."""

    topic: str
    """MQTT filter; ``%u`` username, ``%c`` client id, ``%t`` tenant, ``%d`` device, ``%%``."""
    action: Literal["publish", "subscribe", "both"]
    permission: Literal["allow", "deny"] = "allow"
    tenant: str | None = None
    """Only clients of this tenant (default: every tenant)."""
    device: str | None = None
    """Only this device (default: every device)."""


class TlsSection(_Base, frozen=True):
    """``[auth.tls]``: an MQTT-over-TLS listener. Relative paths are from the config's dir."""

    certfile: str
    """Server certificate chain (PEM)."""
    keyfile: str
    """Server private key (PEM, unencrypted)."""
    listen: str = "0.0.0.0:8883"
    cafile: str | None = None
    """CA bundle that verifies client certificates; without it none are asked for."""
    require_client_cert: bool = False
    """Refuse the TLS handshake of a client without a valid certificate (needs ``cafile``)."""
    identity: CertificateIdentity = "cn"
    """Which part of a client certificate names the client: its CN, or its first DNS/URI
    subject alternative name."""


class LimitsSection(_Base, frozen=True):
    """``[auth.limits]``; a limit left out is no limit."""

    messages_per_s: PositiveFloat | None = None
    """Per client: PUBLISH packets per second, sustained."""
    bytes_per_s: PositiveFloat | None = None
    """Per client: bytes read per second, sustained."""
    burst_s: PositiveFloat = 1.0
    """How many seconds' worth of the two limits above a client may send at once."""
    connections_per_s_per_address: PositiveFloat | None = None
    """New connections per second from one source address (bursts of up to the next whole
    number); more are refused before CONNECT is read."""


class AuthSection(_Base, frozen=True):
    """``[auth]``: authentication, authorization and limits of the MQTT listeners."""

    allow_anonymous: bool = False
    """Let clients in that send no user name and no client certificate."""
    credentials_file: str | None = None
    """``username:<hash>`` lines (``iot-gateway passwd``); relative to the config's dir."""
    default_tenant: TenantName = "default"
    """Tenant of anonymous clients and of users not listed in ``users``."""
    users: list[AuthUser] = []
    """User name (or certificate identity) → tenant."""
    device_id: Literal["client_id", "certificate"] = "client_id"
    """Where an identity's device comes from: the MQTT client id, or the client certificate
    (needs ``tls.require_client_cert``)."""
    acl: list[AclRule] = []
    """Ordered; first match wins; none matching denies; no rules at all allows everything."""
    tls: TlsSection | None = None
    limits: LimitsSection = LimitsSection()
    cache_size: NonNegInt = 100_000
    """Recently verified passwords remembered (0: none); about 200 bytes each."""
    max_concurrent_hashes: PositiveInt = 4
    """Password hashes computed at once (each scrypt holds 16 MiB while it runs)."""
    max_waiting_hashes: NonNegInt = 10_000
    """CONNECTs waiting for a hash slot; beyond, they are refused with 0x89 (server busy)."""
    check_interval_s: PositiveFloat = 2.0
    """How often, at most, the credentials file is checked for changes."""


# --------------------------------------------------------------------------- password hashes

_SCRYPT_N, _SCRYPT_R, _SCRYPT_P = 16384, 8, 1  # ~50 ms and 16 MiB per hash
_PBKDF2_ITERATIONS = 600_000  # OWASP's 2023 figure for PBKDF2-HMAC-SHA256
_SALT_BYTES, _HASH_BYTES = 16, 32
_SCRYPT_MAX_MEMORY = 64 * 1024 * 1024  # a hostile file must not make each check take a GB
_SCRYPT_PARAMS = re.compile(r"n=(\d{1,8}),r=(\d{1,3}),p=(\d{1,3})")


def _ab64_encode(data: bytes) -> str:
    """passlib's adapted base64 ('.' for '+', no padding), so PBKDF2 hashes interoperate."""
    return base64.b64encode(data).decode("ascii").rstrip("=").replace("+", ".")


def _ab64_decode(text: str) -> bytes:
    text = text.replace(".", "+")
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


class _Hash(NamedTuple):
    scheme: Scheme
    params: tuple[int, ...]  # scrypt: (n, r, p); pbkdf2: (iterations,)
    salt: bytes
    digest: bytes


def _parse_hash(stored: str) -> _Hash:
    """A stored hash, checked for sane parameters; ValueError says what is wrong."""
    fields = stored.split("$")
    if len(fields) != 5 or fields[0]:
        raise ValueError("expected $scheme$params$salt$hash")
    _, scheme, params_text, salt_text, digest_text = fields
    try:
        salt, digest = _ab64_decode(salt_text), _ab64_decode(digest_text)
    except ValueError:
        raise ValueError("salt or hash is not base64") from None
    if len(salt) < 8 or len(digest) < 16:
        raise ValueError("salt (>= 8 bytes) or hash (>= 16 bytes) too short")
    if scheme == "scrypt":
        m = _SCRYPT_PARAMS.fullmatch(params_text)
        if m is None:
            raise ValueError("scrypt parameters: expected n=<N>,r=<R>,p=<P>")
        n, r, p = int(m[1]), int(m[2]), int(m[3])
        if n < 1024 or n & (n - 1) or not 1 <= r <= 32 or not 1 <= p <= 16:
            raise ValueError("scrypt parameters: n a power of 2 >= 1024, r 1..32, p 1..16")
        if 128 * r * n > _SCRYPT_MAX_MEMORY:
            raise ValueError("scrypt parameters: more than 64 MiB per hash")
        return _Hash("scrypt", (n, r, p), salt, digest)
    if scheme == "pbkdf2-sha256":
        if not params_text.isdigit() or not 1000 <= int(params_text) <= 100_000_000:
            raise ValueError("pbkdf2-sha256 iterations: expected 1000..100000000")
        return _Hash("pbkdf2-sha256", (int(params_text),), salt, digest)
    raise ValueError(f"unknown scheme {scheme!r} (expected one of {', '.join(SCHEMES)})")


def _derive(scheme: Scheme, params: tuple[int, ...], salt: bytes, password: bytes,
            length: int) -> bytes:
    if scheme == "scrypt":
        n, r, p = params
        return hashlib.scrypt(password, salt=salt, n=n, r=r, p=p, dklen=length,
                              maxmem=128 * r * (n + p + 2) + 1024 * 1024)
    return hashlib.pbkdf2_hmac("sha256", password, salt, params[0], length)


def hash_password(password: str, scheme: Scheme = "scrypt", *, cost: int | None = None) -> str:
    """A salted, slow, self-describing hash of ``password`` for the credentials file:
    ``$scrypt$n=16384,r=8,p=1$<salt>$<hash>`` or ``$pbkdf2-sha256$600000$<salt>$<hash>``
    (salt and hash in passlib's adapted base64). ``cost`` overrides scrypt's n or PBKDF2's
    iterations (tests use it to go fast)."""
    salt = secrets.token_bytes(_SALT_BYTES)
    if scheme == "scrypt":
        params: tuple[int, ...] = (cost or _SCRYPT_N, _SCRYPT_R, _SCRYPT_P)
        text = "n={},r={},p={}".format(*params)
    elif scheme == "pbkdf2-sha256":
        params = (cost or _PBKDF2_ITERATIONS,)
        text = str(params[0])
    else:
        raise ValueError(f"unknown scheme {scheme!r} (expected one of {', '.join(SCHEMES)})")
    digest = _derive(scheme, params, salt, password.encode(), _HASH_BYTES)
    stored = f"${scheme}${text}${_ab64_encode(salt)}${_ab64_encode(digest)}"
    _parse_hash(stored)  # a cost out of the accepted range must not produce a dead entry
    return stored


def verify_password(stored: str, password: bytes) -> bool:
    """Whether ``password`` matches ``stored`` (constant-time comparison). Slow by design:
    call it from a thread. Raises ValueError if ``stored`` is malformed."""
    h = _parse_hash(stored)
    return hmac.compare_digest(_derive(h.scheme, h.params, h.salt, password, len(h.digest)),
                               h.digest)


@functools.cache
def _dummy_hash() -> str:
    return hash_password(secrets.token_urlsafe(16))


# --------------------------------------------------------------------------- credentials file


class CredentialsError(ConfigError):
    """The credentials file cannot be read or holds a malformed line (``file:line: ...``)."""


def check_username(username: str) -> None:
    """ValueError unless ``username`` can be a line of the credentials file."""
    if not username:
        raise ValueError("empty user name")
    if ":" in username:
        raise ValueError("a user name cannot contain ':'")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in username):
        raise ValueError("a user name cannot contain control characters")
    if username.startswith("#"):
        raise ValueError("a user name cannot start with '#' (it would read as a comment)")
    if username != username.strip():
        raise ValueError("a user name cannot start or end with white space")


class CredentialsFile:
    """The users and password hashes of one file, with its comments kept for rewriting."""

    def __init__(self, path: str | Path, lines: list[str] | None = None) -> None:
        self.path = Path(path)
        self._lines = lines if lines is not None else []
        self._hashes: dict[str, str] = {}
        self._line_of: dict[str, int] = {}  # username → index in _lines
        for index, line in enumerate(self._lines):
            try:
                entry = self._parse_line(line)
            except ValueError as err:
                raise CredentialsError(f"{self.path}:{index + 1}: {err}") from None
            if entry is None:
                continue
            username, stored = entry
            if username in self._hashes:
                first = self._line_of[username] + 1
                raise CredentialsError(f"{self.path}:{index + 1}: user {username!r} repeated "
                                       f"(first on line {first})")
            self._hashes[username] = stored
            self._line_of[username] = index

    @staticmethod
    def _parse_line(line: str) -> tuple[str, str] | None:
        """(username, hash), or None for a comment or blank line."""
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            return None
        username, sep, stored = line.partition(":")
        if not sep:
            raise ValueError("expected username:hash")
        check_username(username)
        stored = stored.strip()
        try:
            _parse_hash(stored)
        except ValueError as err:
            raise ValueError(f"user {username!r}: {err}") from None
        return username, stored

    @classmethod
    def load(cls, path: str | Path, *, missing_ok: bool = False) -> CredentialsFile:
        """Read and check ``path``; with ``missing_ok`` a missing file is an empty one."""
        try:
            data = Path(path).read_bytes()
        except FileNotFoundError:
            if missing_ok:
                return cls(path)
            raise CredentialsError(f"{path}: cannot read: no such file") from None
        except OSError as err:
            raise CredentialsError(f"{path}: cannot read: {err.strerror}") from None
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as err:
            line = data[: err.start].count(b"\n") + 1
            raise CredentialsError(f"{path}:{line}: not UTF-8") from None
        lines = text.split("\n")
        if lines and lines[-1] == "":
            lines.pop()  # the final newline ends the last line; it does not start another
        return cls(path, [line.removesuffix("\r") for line in lines])

    def __len__(self) -> int:
        return len(self._hashes)

    def __contains__(self, username: object) -> bool:
        return username in self._hashes

    def get(self, username: str) -> str | None:
        """The stored hash of ``username``, or None."""
        return self._hashes.get(username)

    def set(self, username: str, stored: str) -> bool:
        """Add ``username`` or replace their hash; True if they were new."""
        check_username(username)
        _parse_hash(stored)
        line = f"{username}:{stored}"
        index = self._line_of.get(username)
        self._hashes[username] = stored
        if index is not None:
            self._lines[index] = line
            return False
        self._line_of[username] = len(self._lines)
        self._lines.append(line)
        return True

    def delete(self, username: str) -> bool:
        """Remove ``username``; False if there was no such user."""
        index = self._line_of.pop(username, None)
        if index is None:
            return False
        del self._hashes[username]
        del self._lines[index]
        for name, i in self._line_of.items():
            if i > index:
                self._line_of[name] = i - 1
        return True

    def render(self) -> bytes:
        return "".join(line + "\n" for line in self._lines).encode("utf-8")

    def save(self) -> None:
        """Write the file atomically, mode 0600."""
        write_atomically(self.path, self.render(), mode=0o600)


# --------------------------------------------------------------------------- authentication


class Identity(Struct, frozen=True, kw_only=True):
    """Who an accepted client is: what ACLs, classification and quotas go by."""

    username: str | None
    client_id: str
    tenant: str
    device: str


class AuthResult(Struct, frozen=True, kw_only=True):
    """The answer to a CONNECT: accepted with an identity, or refused with a reason code."""

    ok: bool
    reason_code: int
    """0 when accepted; else the MQTT 5 CONNACK reason code (the codec maps it for 3.1.1)."""
    identity: Identity | None = None
    reason: str = ""
    """Why, for the log; never sent to the client."""


def _refused(code: ReasonCode, reason: str) -> AuthResult:
    return AuthResult(ok=False, reason_code=int(code), reason=reason)


def _file_signature(path: Path) -> tuple[int, int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


class Authenticator:
    """Checks CONNECT credentials (see the module docstring); one per process, used from
    the event loop."""

    def __init__(self, *, credentials: CredentialsFile | None = None,
                 allow_anonymous: bool = False, tenants: Mapping[str, str] | None = None,
                 default_tenant: str = "default",
                 device_id: Literal["client_id", "certificate"] = "client_id",
                 cache_size: int = 100_000, max_concurrent_hashes: int = 4,
                 max_waiting_hashes: int = 10_000, check_interval_s: float = 2.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.allow_anonymous = allow_anonymous
        self.tenants = dict(tenants or {})
        self.default_tenant = default_tenant
        self.device_id = device_id
        self.cache_size = cache_size
        self.max_concurrent_hashes = max_concurrent_hashes
        self.max_waiting_hashes = max_waiting_hashes
        self.check_interval_s = check_interval_s
        self._clock = clock
        self._credentials = credentials
        self._signature = _file_signature(credentials.path) if credentials else None
        self._rejected_signature: tuple[int, int, int, int] | None = None
        self._next_check = clock() + check_interval_s
        self._reloading = False
        self._generation = 0
        self._key = secrets.token_bytes(32)  # per process: a cache dump reveals nothing
        self._verified: dict[str, bytes] = {}  # username → HMAC(key, password)
        self._hash_slots = asyncio.Semaphore(max_concurrent_hashes)
        self._hashing = 0  # computing or waiting for a slot

    @property
    def credentials(self) -> CredentialsFile | None:
        return self._credentials

    @property
    def cached(self) -> int:
        """How many verified passwords are remembered."""
        return len(self._verified)

    def replace_credentials(self, credentials: CredentialsFile | None) -> None:
        """Use these credentials from now on; forgets every remembered password."""
        self._credentials = credentials
        self._signature = _file_signature(credentials.path) if credentials else None
        self._generation += 1
        self._verified.clear()

    async def reload_credentials(self) -> bool:
        """Re-read the credentials file if it changed since it was read (in a thread); True
        if new credentials are in use. A file that does not parse is logged and ignored."""
        self._next_check = self._clock() + self.check_interval_s
        if self._credentials is None or self._reloading:
            return False
        path = self._credentials.path
        signature = _file_signature(path)
        if signature is None or signature in (self._signature, self._rejected_signature):
            return False
        self._reloading = True
        try:
            credentials = await asyncio.to_thread(CredentialsFile.load, path)
        except CredentialsError as err:
            self._rejected_signature = signature
            log.warning("keeping the previous credentials: %s", err)
            return False
        finally:
            self._reloading = False
        self.replace_credentials(credentials)
        self._signature = signature  # what was stat-ed before reading: a later change shows
        log.info("credentials reloaded from %s: %d users", path, len(credentials))
        return True

    def identity(self, username: str | None, client_id: str,
                 peer_cert_identity: str | None) -> Identity:
        """The identity of an accepted client (see the module docstring)."""
        tenant = self.default_tenant
        if username is not None:
            tenant = self.tenants.get(username, tenant)
        device = client_id
        if self.device_id == "certificate" and peer_cert_identity is not None:
            device = peer_cert_identity
        return Identity(username=username, client_id=client_id, tenant=tenant, device=device)

    def decide_now(self, username: str | None, password: bytes | None, *,
                   client_id: str, peer_cert_identity: str | None,
                   authentication_method: str | None = None) -> AuthResult | None:
        """Decide on a CONNECT without hashing a password, when that is possible: anonymous
        and certificate logins, refusals, and passwords verified before (a reconnect storm
        of known devices costs microseconds each). None: ``authenticate`` must hash."""
        if authentication_method is not None:
            return _refused(ReasonCode.BAD_AUTHENTICATION_METHOD,
                            f"authentication method {authentication_method!r} not supported")
        if self.device_id == "certificate" and peer_cert_identity is None:
            return _refused(ReasonCode.NOT_AUTHORIZED, "no client certificate")
        if username is None:
            if password is not None:
                return _refused(ReasonCode.BAD_USER_NAME_OR_PASSWORD, "password without user name")
            if peer_cert_identity is not None:
                return self._accepted(peer_cert_identity, client_id, peer_cert_identity)
            if self.allow_anonymous:
                return self._accepted(None, client_id, None)
            return _refused(ReasonCode.NOT_AUTHORIZED, "anonymous access is not allowed")
        if self._credentials is not None and self._clock() >= self._next_check:
            return None  # the file may have changed: ``authenticate`` re-reads it first
        if self._credentials is None:
            # Without a credentials file a user name proves nothing. Where anyone may connect
            # anyway (a development setup, as Mosquitto without a password file), it is taken
            # as a label only: it never selects a tenant.
            if self.allow_anonymous:
                return AuthResult(ok=True, reason_code=0, identity=Identity(
                    username=username, client_id=client_id, tenant=self.default_tenant,
                    device=client_id))
            return _refused(ReasonCode.BAD_USER_NAME_OR_PASSWORD, "no credentials file")
        if password is None:
            return _refused(ReasonCode.BAD_USER_NAME_OR_PASSWORD, "user name without password")
        remembered = self._verified.get(username)
        if remembered is not None and hmac.compare_digest(
                remembered, hmac.digest(self._key, password, "sha256")):
            return self._accepted(username, client_id, peer_cert_identity)
        if self._hashing >= self.max_concurrent_hashes + self.max_waiting_hashes:
            return _refused(ReasonCode.SERVER_BUSY, "too many password checks waiting")
        return None

    async def authenticate(self, username: str | None, password: bytes | None, *,
                           client_id: str, peer_cert_identity: str | None,
                           authentication_method: str | None = None,
                           loop_executor: Executor | None = None) -> AuthResult:
        """Decide on a CONNECT. ``client_id`` is the one the session uses (assigned by the
        broker if the client sent none); ``peer_cert_identity`` comes from a client
        certificate the TLS layer verified; ``authentication_method`` is the MQTT 5
        property (enhanced authentication is not supported: refused with 0x8C)."""
        if self._credentials is not None and self._clock() >= self._next_check:
            await self.reload_credentials()
        decided = self.decide_now(username, password, client_id=client_id,
                                  peer_cert_identity=peer_cert_identity,
                                  authentication_method=authentication_method)
        if decided is not None:
            return decided
        assert username is not None and password is not None and self._credentials is not None
        generation = self._generation
        ok = await self._verify_in_thread(self._credentials.get(username), password,
                                          loop_executor)
        if not ok:
            return _refused(ReasonCode.BAD_USER_NAME_OR_PASSWORD, "bad user name or password")
        if generation == self._generation and self.cache_size:
            if len(self._verified) >= self.cache_size:
                del self._verified[next(iter(self._verified))]  # the oldest entry
            self._verified[username] = hmac.digest(self._key, password, "sha256")
        return self._accepted(username, client_id, peer_cert_identity)

    async def _verify_in_thread(self, stored: str | None, password: bytes,
                                executor: Executor | None) -> bool:
        self._hashing += 1
        try:
            async with self._hash_slots:
                if executor is None:
                    return await asyncio.to_thread(_check_password, stored, password)
                loop = asyncio.get_running_loop()
                return await loop.run_in_executor(executor, _check_password, stored, password)
        finally:
            self._hashing -= 1

    def _accepted(self, username: str | None, client_id: str,
                  peer_cert_identity: str | None) -> AuthResult:
        return AuthResult(ok=True, reason_code=0,
                          identity=self.identity(username, client_id, peer_cert_identity))


def _check_password(stored: str | None, password: bytes) -> bool:
    """In a worker thread. An unknown user costs a hash too, against a dummy."""
    matches = verify_password(stored if stored is not None else _dummy_hash(), password)
    return matches and stored is not None


# --------------------------------------------------------------------------- passwd command


@click.command("passwd")
@click.argument("file", type=click.Path(path_type=Path, dir_okay=False))
@click.argument("username")
@click.option("--password-stdin", is_flag=True,
              help="Read the password from the first line of standard input.")
@click.option("--delete", is_flag=True, help="Remove the user instead.")
@click.option("--scheme", type=click.Choice(SCHEMES), default="scrypt", show_default=True,
              help="Password hash.")
def passwd_command(file: Path, username: str, password_stdin: bool, delete: bool,
                   scheme: Scheme) -> None:
    """Add USERNAME to the credentials FILE or change their password (asked twice), or
    remove them (--delete). FILE is created (mode 0600) if missing and replaced atomically;
    a running gateway picks the change up within seconds."""
    try:
        check_username(username)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="USERNAME") from None
    if delete and password_stdin:
        raise click.UsageError("--delete takes no password (drop --password-stdin)")
    try:
        credentials = CredentialsFile.load(file, missing_ok=not delete)
    except CredentialsError as err:
        raise click.ClickException(str(err)) from None
    if delete:
        if not credentials.delete(username):
            raise click.ClickException(f"{file}: no user {username!r}")
        done = f"removed {username!r} from {file}"
    else:
        password = _read_password(password_stdin)
        added = credentials.set(username, hash_password(password, scheme))
        done = f"{'added' if added else 'changed the password of'} {username!r} in {file}"
    try:
        credentials.save()
    except OSError as err:
        raise click.ClickException(f"{file}: cannot write: {err.strerror or err}") from None
    click.echo(done)


def _read_password(from_stdin: bool) -> str:
    if from_stdin:
        line = sys.stdin.readline()
        password = line.removesuffix("\n").removesuffix("\r")
        if not password:
            raise click.UsageError("--password-stdin: no password on the first line")
        return password
    password = str(click.prompt("Password", hide_input=True))
    if password != click.prompt("Repeat password", hide_input=True):
        raise click.ClickException("the passwords do not match")
    return password


# --------------------------------------------------------------------------- TLS


def server_ssl_context(certfile: str | Path, keyfile: str | Path, cafile: str | Path | None = None,
                       require_client_cert: bool = False) -> ssl.SSLContext:
    """A server-side context: TLS 1.2 or later, OpenSSL's secure default ciphers. With
    ``cafile`` clients may present a certificate signed by it (``require_client_cert``:
    must). Raises OSError or ssl.SSLError if a file cannot be loaded, ValueError if a
    client certificate is required without a CA to check it."""
    if require_client_cert and cafile is None:
        raise ValueError("require_client_cert needs a cafile to verify client certificates")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # Client-initiated renegotiation lets one client make the server do handshakes for free.
    context.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_CIPHER_SERVER_PREFERENCE
    context.load_cert_chain(certfile, keyfile)
    if cafile is not None:
        context.load_verify_locations(cafile)
        context.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    return context


def identity_from_certificate(peercert: Mapping[str, Any] | None,
                              use: CertificateIdentity) -> str | None:
    """The identity in a verified peer certificate (``SSLSocket.getpeercert()``): its
    subject CN (None if it has none, or several), or its first DNS or URI subject
    alternative name."""
    if not peercert:
        return None
    if use == "cn":
        names = [value for rdn in peercert.get("subject", ()) for key, value in rdn
                 if key == "commonName"]
        return names[0] if len(names) == 1 and names[0] else None
    for kind, value in peercert.get("subjectAltName", ()):
        if kind in ("DNS", "URI") and value:
            return str(value)
    return None


# --------------------------------------------------------------------------- ACL

_PLACEHOLDER = re.compile(r"%(.?)", re.DOTALL)
_IDENTITY_FIELDS = {"u": "username", "c": "client_id", "t": "tenant", "d": "device"}
_UNSAFE_IN_LEVEL = ("+", "#", "/", "\0")
_MAX_IDENTITIES = 65_536
_MAX_DECISIONS = 1024  # per identity and action


def check_acl_pattern(topic: str) -> None:
    """ValueError unless ``topic`` is a valid ACL pattern."""
    for m in _PLACEHOLDER.finditer(topic):
        if m[1] not in _IDENTITY_FIELDS and m[1] != "%":
            raise ValueError(f"unknown placeholder %{m[1]} in {topic!r} "
                             "(expected %u, %c, %t, %d or %%)")
    compile_topic_filter(_PLACEHOLDER.sub(lambda m: "%" if m[1] == "%" else "x", topic))


def _safe_value(value: str | None) -> bool:
    """Whether ``value`` can fill in a placeholder without widening the pattern."""
    if not value or value.startswith("$"):
        return False
    return not any(c in value for c in _UNSAFE_IN_LEVEL)


def _substitute(topic: str, identity: Identity) -> str | None:
    """``topic`` with the identity's values filled in (one pass: a value that looks like a
    placeholder stays literal); None if a value could widen the pattern."""
    unsafe = False

    def value(m: re.Match[str]) -> str:
        nonlocal unsafe
        if m[1] == "%":
            return "%"
        text: str | None = getattr(identity, _IDENTITY_FIELDS[m[1]])
        if text is None or not _safe_value(text):
            unsafe = True
            return ""
        return text

    result = _PLACEHOLDER.sub(value, topic)
    return None if unsafe else result


def _filter_levels(topic_filter: str) -> tuple[str, ...] | None:
    """The levels of a valid topic filter, or None."""
    if not topic_filter or "\0" in topic_filter:
        return None
    levels = tuple(topic_filter.split("/"))
    for i, level in enumerate(levels):
        if level == "#" and i != len(levels) - 1:
            return None
        if len(level) > 1 and ("+" in level or "#" in level):
            return None
    return levels


def _unshare(topic_filter: str) -> str | None:
    """``$share/<group>/<filter>`` → ``<filter>``; None if malformed."""
    if not topic_filter.startswith("$share/"):
        return topic_filter
    parts = topic_filter.split("/", 2)
    if len(parts) != 3 or not parts[1] or "+" in parts[1] or "#" in parts[1] or not parts[2]:
        return None
    return parts[2]


def _wild_vs_dollar(i: int, level: str | None) -> bool:
    """A wildcard at the first level never matches a ``$`` topic level."""
    return i == 0 and level is not None and level.startswith("$")


def _inside(pattern: tuple[str, ...], levels: tuple[str, ...]) -> bool:
    """Whether every topic the filter ``levels`` matches also matches ``pattern``."""
    for i, want in enumerate(pattern):
        have = levels[i] if i < len(levels) else None
        if want == "#":  # also matches the parent level, so a shorter filter is inside
            return not _wild_vs_dollar(i, have)
        if have == "#" and want == "+" and i == 0 and pattern[1:] == ("#",):
            return True  # no topic has zero levels, so at the top "+/#" is the same as "#"
        if have is None or have == "#":
            return False
        if want == "+":
            if _wild_vs_dollar(i, have):
                return False
        elif have != want:  # a "+" in the filter is inside only a "+" or "#" pattern level
            return False
    return len(levels) == len(pattern)


def _overlaps(pattern: tuple[str, ...], levels: tuple[str, ...]) -> bool:
    """Whether some topic matches both ``pattern`` and the filter ``levels``."""
    for i in range(max(len(pattern), len(levels))):
        a = pattern[i] if i < len(pattern) else None
        b = levels[i] if i < len(levels) else None
        if a == "#" or b == "#":
            return not (_wild_vs_dollar(i, a) or _wild_vs_dollar(i, b))
        if a is None or b is None:
            return False
        if a == "+" or b == "+":
            if (a == "+") != (b == "+") and _wild_vs_dollar(i, a if b == "+" else b):
                return False
        elif a != b:
            return False
    return True


class _Rule(NamedTuple):
    allow: bool
    publish: bool
    subscribe: bool
    topic: str
    tenant: str | None
    device: str | None


class _BoundRule(NamedTuple):
    allow: bool
    levels: tuple[str, ...] | None  # None: could not be filled in safely (a deny of all)
    regex: re.Pattern[str] | None


class IdentityAcl:
    """The ACL compiled for one identity; remembers its recent decisions."""

    __slots__ = ("_pub_cache", "_pub_rules", "_sub_cache", "_sub_rules", "_unrestricted",
                 "identity")

    def __init__(self, identity: Identity, rules: list[_Rule], unrestricted: bool) -> None:
        self.identity = identity
        self._unrestricted = unrestricted
        self._pub_rules: list[_BoundRule] = []
        self._sub_rules: list[_BoundRule] = []
        self._pub_cache: dict[str, bool] = {}
        self._sub_cache: dict[str, bool] = {}
        for rule in rules:
            if rule.tenant is not None and rule.tenant != identity.tenant:
                continue
            if rule.device is not None and rule.device != identity.device:
                continue
            topic = _substitute(rule.topic, identity)
            if topic is None:
                if rule.allow:
                    continue
                bound = _BoundRule(False, None, None)
            else:
                bound = _BoundRule(rule.allow, tuple(topic.split("/")),
                                   compile_topic_filter(topic))
            if rule.publish:
                self._pub_rules.append(bound)
            if rule.subscribe:
                self._sub_rules.append(bound)

    @property
    def restricted(self) -> bool:
        """False when no ACL rule is configured: everything is allowed, nothing to check."""
        return not self._unrestricted

    def can_publish(self, topic: str) -> bool:
        """Whether this identity may publish to the topic name ``topic``."""
        decision = self._pub_cache.get(topic)
        if decision is None:
            decision = self._decide_publish(topic)
            if len(self._pub_cache) >= _MAX_DECISIONS:
                self._pub_cache.clear()
            self._pub_cache[topic] = decision
        return decision

    def can_subscribe(self, topic_filter: str) -> bool:
        """Whether this identity may subscribe to ``topic_filter``: only if it may receive
        every topic the filter can match."""
        decision = self._sub_cache.get(topic_filter)
        if decision is None:
            decision = self._decide_subscribe(topic_filter)
            if len(self._sub_cache) >= _MAX_DECISIONS:
                self._sub_cache.clear()
            self._sub_cache[topic_filter] = decision
        return decision

    def _decide_publish(self, topic: str) -> bool:
        if not topic or "+" in topic or "#" in topic or "\0" in topic:
            return False
        if self._unrestricted:
            return True
        for rule in self._pub_rules:
            if rule.regex is None or rule.regex.match(topic):
                return rule.allow
        return False

    def _decide_subscribe(self, topic_filter: str) -> bool:
        inner = _unshare(topic_filter)
        levels = _filter_levels(inner) if inner is not None else None
        if levels is None:
            return False
        if self._unrestricted:
            return True
        for rule in self._sub_rules:
            if rule.levels is None:
                return False
            if rule.allow:
                if _inside(rule.levels, levels):
                    return True
            elif _overlaps(rule.levels, levels):
                return False
        return False  # nothing covered it whole: some topic it matches is not allowed


class Acl:
    """Ordered allow/deny rules (see the module docstring for the precedence)."""

    def __init__(self, rules: list[AclRule], *, max_identities: int = _MAX_IDENTITIES) -> None:
        """Raises ValueError naming the rule (``acl[2].topic: ...``) if one is invalid."""
        self._rules: list[_Rule] = []
        for i, rule in enumerate(rules):
            try:
                check_acl_pattern(rule.topic)
            except ValueError as err:
                raise ValueError(f"acl[{i}].topic: {err}") from None
            self._rules.append(_Rule(rule.permission == "allow",
                                     rule.action in ("publish", "both"),
                                     rule.action in ("subscribe", "both"),
                                     rule.topic, rule.tenant, rule.device))
        self._unrestricted = not rules
        self._max_identities = max_identities
        self._bound: dict[Identity, IdentityAcl] = {}

    def bind(self, identity: Identity) -> IdentityAcl:
        """The ACL of one identity; a connection can keep it for its lifetime."""
        bound = self._bound.get(identity)
        if bound is None:
            bound = IdentityAcl(identity, self._rules, self._unrestricted)
            if len(self._bound) >= self._max_identities:
                del self._bound[next(iter(self._bound))]  # the oldest entry
            self._bound[identity] = bound
        return bound

    def can_publish(self, identity: Identity, topic: str) -> bool:
        return self.bind(identity).can_publish(topic)

    def can_subscribe(self, identity: Identity, topic_filter: str) -> bool:
        return self.bind(identity).can_subscribe(topic_filter)


# --------------------------------------------------------------------------- rate limits


class TokenBucket:
    """``rate`` tokens per second, up to ``burst``. ``consume`` may go into debt: what has
    been read has been read, and the returned wait is how long to pause reading to pay it."""

    __slots__ = ("_tokens", "_updated", "burst", "rate")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        if rate <= 0 or burst <= 0:
            raise ValueError("rate and burst must be > 0")
        self.rate = rate
        self.burst = burst
        self._tokens = burst
        self._updated = now

    def consume(self, n: float, now: float) -> float:
        """Take ``n`` tokens; the seconds to wait before reading more (0 if within limits)."""
        if now > self._updated:
            self._tokens = min(self.burst, self._tokens + (now - self._updated) * self.rate)
            self._updated = now
        self._tokens -= n
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate


class ClientRateLimiter:
    """One client's messages/s and bytes/s buckets."""

    __slots__ = ("_bytes", "_messages", "timer")

    def __init__(self, limits: LimitsSection, now: float) -> None:
        self.timer: asyncio.TimerHandle | None = None
        """The caller's pending resume of reading, if paused (one at a time)."""
        self._messages = None if limits.messages_per_s is None else TokenBucket(
            limits.messages_per_s, max(1.0, limits.messages_per_s * limits.burst_s), now)
        self._bytes = None if limits.bytes_per_s is None else TokenBucket(
            limits.bytes_per_s, max(1.0, limits.bytes_per_s * limits.burst_s), now)

    def consume(self, messages: int, nbytes: int, now: float) -> float:
        """Account for what was read; seconds to pause reading (0 if within limits)."""
        wait = 0.0
        if self._messages is not None and messages:
            wait = self._messages.consume(messages, now)
        if self._bytes is not None and nbytes:
            wait = max(wait, self._bytes.consume(nbytes, now))
        return wait


class ConnectionFloodGuard:
    """At most ``max_per_window`` new connections per ``window_s`` from one address (a token
    bucket each). An address quiet for a whole window has a full bucket again, which is
    the same as not being known: it is forgotten, so memory follows the addresses active in
    the last window, and never exceeds ``max_addresses`` (the least recent go first)."""

    def __init__(self, max_per_window: int, window_s: float, *,
                 max_addresses: int = 100_000) -> None:
        if max_per_window < 1 or window_s <= 0:
            raise ValueError("max_per_window must be >= 1 and window_s > 0")
        self.max_per_window = max_per_window
        self.window_s = window_s
        self.max_addresses = max_addresses
        self._rate = max_per_window / window_s
        self._buckets: dict[str, tuple[float, float]] = {}  # address → (tokens, updated)

    def __len__(self) -> int:
        return len(self._buckets)

    def allow(self, address: str, now: float) -> bool:
        """Whether a new connection from ``address`` may proceed now (and count it if so)."""
        buckets = self._buckets
        # Entries are kept in order of last use: the expired ones are at the front.
        while buckets:
            oldest = next(iter(buckets))
            if now - buckets[oldest][1] < self.window_s and len(buckets) < self.max_addresses:
                break
            del buckets[oldest]
        tokens, updated = buckets.pop(address, (float(self.max_per_window), now))
        tokens = min(float(self.max_per_window), tokens + max(0.0, now - updated) * self._rate)
        allowed = tokens >= 1.0
        buckets[address] = (tokens - 1.0 if allowed else tokens, max(now, updated))
        return allowed


# --------------------------------------------------------------------------- assembly


@dataclass(frozen=True, slots=True)
class TlsListener:
    host: str
    port: int
    context: ssl.SSLContext
    identity: CertificateIdentity

    def identity_of(self, peercert: Mapping[str, Any] | None) -> str | None:
        return identity_from_certificate(peercert, self.identity)


@dataclass(frozen=True, slots=True)
class Security:
    """Everything ``[auth]`` determines, built by ``build_security``."""

    authenticator: Authenticator
    acl: Acl
    tls: TlsListener | None
    limits: LimitsSection
    flood_guard: ConnectionFloodGuard | None

    def client_rate_limiter(self, now: float) -> ClientRateLimiter | None:
        """A fresh limiter for a new client, or None when no per-client limit is set."""
        if self.limits.messages_per_s is None and self.limits.bytes_per_s is None:
            return None
        return ClientRateLimiter(self.limits, now)


def build_security(section: AuthSection, base_dir: str | Path) -> Security:
    """Check ``section`` and build what it describes; relative paths are from ``base_dir``
    (the config file's directory). Raises ConfigError naming the place."""
    base = Path(base_dir)
    seen: dict[str, int] = {}
    for i, user in enumerate(section.users):
        if user.username in seen:
            raise ConfigError(f"auth.users[{i}].username: {user.username!r} is already "
                              f"auth.users[{seen[user.username]}]")
        seen[user.username] = i
    try:
        acl = Acl(section.acl)
    except ValueError as err:
        raise ConfigError(f"auth.{err}") from None

    credentials = None
    if section.credentials_file is not None:
        try:
            credentials = CredentialsFile.load(base / section.credentials_file)
        except CredentialsError as err:
            raise ConfigError(f"auth.credentials_file: {err}") from None

    tls = None
    if section.tls is not None:
        tls = _build_tls(section.tls, base)
    client_certs = section.tls is not None and section.tls.cafile is not None
    if section.device_id == "certificate" and not (
            section.tls is not None and section.tls.require_client_cert):
        raise ConfigError('auth.device_id: "certificate" needs auth.tls.require_client_cert')
    if not (section.allow_anonymous or credentials is not None or client_certs):
        raise ConfigError("auth: no client could connect: set allow_anonymous = true, a "
                          "credentials_file, or tls.cafile for client certificates")

    authenticator = Authenticator(
        credentials=credentials, allow_anonymous=section.allow_anonymous,
        tenants={u.username: u.tenant for u in section.users},
        default_tenant=section.default_tenant, device_id=section.device_id,
        cache_size=section.cache_size, max_concurrent_hashes=section.max_concurrent_hashes,
        max_waiting_hashes=section.max_waiting_hashes,
        check_interval_s=section.check_interval_s)
    flood_guard = None
    rate = section.limits.connections_per_s_per_address
    if rate is not None:
        burst = math.ceil(rate)  # a whole connection at least, at exactly `rate` per second
        flood_guard = ConnectionFloodGuard(burst, burst / rate)
    return Security(authenticator, acl, tls, section.limits, flood_guard)


def _build_tls(tls: TlsSection, base: Path) -> TlsListener:
    from gateway.config import split_host_port  # gateway.config imports this module

    try:
        host, port = split_host_port(tls.listen)
    except ValueError as err:
        raise ConfigError(f"auth.tls.listen: {err}") from None
    if tls.require_client_cert and tls.cafile is None:
        raise ConfigError("auth.tls.require_client_cert: needs auth.tls.cafile, the CA that "
                          "signs client certificates")

    def readable(name: str, value: str) -> Path:
        path = base / value
        if not os.access(path, os.R_OK):
            reason = "no such file" if not path.exists() else "not readable"
            raise ConfigError(f"auth.tls.{name}: cannot read {path}: {reason}")
        return path

    certfile = readable("certfile", tls.certfile)
    keyfile = readable("keyfile", tls.keyfile)
    cafile = None if tls.cafile is None else readable("cafile", tls.cafile)
    if cafile is not None:
        try:  # on its own first, so that an error names the right file
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_verify_locations(cafile)
        except (OSError, ssl.SSLError) as err:
            raise ConfigError(f"auth.tls.cafile: cannot load {cafile}: {err}") from None
    try:
        context = server_ssl_context(certfile, keyfile, cafile, tls.require_client_cert)
    except (OSError, ssl.SSLError) as err:
        raise ConfigError(f"auth.tls.certfile: cannot load {certfile} with key {keyfile}: "
                          f"{err}") from None
    return TlsListener(host, port, context, tls.identity)

