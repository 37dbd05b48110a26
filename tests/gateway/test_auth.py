"""gateway.auth: password hashes, the credentials file, the authenticator, the passwd
command, TLS (real handshakes over loopback), ACLs (tenant isolation), rate limits, [auth]."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import itertools
import logging
import os
import re
import ssl
import stat
import threading
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import msgspec
import pytest
from click.testing import CliRunner
from hypothesis import example, given, settings
from hypothesis import strategies as st

import gateway.auth as auth
from gateway.auth import (
    Acl,
    AclRule,
    Authenticator,
    AuthSection,
    ClientRateLimiter,
    ConnectionFloodGuard,
    CredentialsError,
    CredentialsFile,
    Identity,
    LimitsSection,
    TokenBucket,
    build_security,
    hash_password,
    identity_from_certificate,
    passwd_command,
    server_ssl_context,
    verify_password,
)
from gateway.errors import ConfigError
from gateway.statedir import write_atomically
from protocols.mqtt.topics import compile_topic_filter
from tests.pki import Pki, make_pki

FAST_SCRYPT = 1024  # the smallest n accepted: a few ms instead of ~50


def fast_hash(password: str) -> str:
    return hash_password(password, cost=FAST_SCRYPT)


def write_credentials(path: Path, users: dict[str, str]) -> Path:
    path.write_text("".join(f"{user}:{fast_hash(pw)}\n" for user, pw in users.items()))
    return path


# --------------------------------------------------------------------------- hashes


@pytest.mark.parametrize(("scheme", "cost"), [("scrypt", FAST_SCRYPT), ("pbkdf2-sha256", 1000)])
def test_hash_round_trip(scheme: auth.Scheme, cost: int) -> None:
    stored = hash_password("correct horse", scheme, cost=cost)
    assert stored.startswith(f"${scheme}$")
    assert verify_password(stored, b"correct horse")
    assert not verify_password(stored, b"correct horsE")
    assert not verify_password(stored, b"")
    assert hash_password("correct horse", scheme, cost=cost) != stored  # salted


def test_default_scrypt_parameters_are_self_described() -> None:
    stored = hash_password("pw")
    assert re.fullmatch(r"\$scrypt\$n=16384,r=8,p=1\$[A-Za-z0-9./]{22}\$[A-Za-z0-9./]{43}",
                        stored)
    assert verify_password(stored, b"pw")


def test_pbkdf2_hash_is_plain_pbkdf2_in_passlib_format() -> None:
    stored = hash_password("secret", "pbkdf2-sha256", cost=1000)
    _, scheme, iterations, salt, digest = stored.split("$")

    def ab64(text: str) -> bytes:
        text = text.replace(".", "+")
        return base64.b64decode(text + "=" * (-len(text) % 4))

    expected = hashlib.pbkdf2_hmac("sha256", b"secret", ab64(salt), int(iterations), 32)
    assert (scheme, ab64(digest)) == ("pbkdf2-sha256", expected)


@pytest.mark.parametrize(("stored", "message"), [
    ("plain", "expected $scheme$params$salt$hash"),
    ("$md5$1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA", "unknown scheme 'md5'"),
    ("$scrypt$n=1000,r=8,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA", "power of 2"),
    ("$scrypt$n=1048576,r=8,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA", "64 MiB"),
    ("$scrypt$16384$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA", "n=<N>,r=<R>,p=<P>"),
    ("$pbkdf2-sha256$10$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA", "iterations"),
    ("$pbkdf2-sha256$1000$c2FsdA$aGFzaGhhc2hoYXNoaGFzaA", "too short"),
    ("$pbkdf2-sha256$1000$!!!!$aGFzaGhhc2hoYXNoaGFzaA", "not base64"),
])
def test_malformed_or_unsafe_hashes_are_refused(stored: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        verify_password(stored, b"x")


# --------------------------------------------------------------------------- credentials file


def test_credentials_file_reads_comments_blank_lines_and_crlf(tmp_path: Path) -> None:
    hashed = fast_hash("pw")
    path = tmp_path / "creds"
    path.write_bytes(f"# devices\r\n\r\n  # indented comment\npump-7:{hashed}\r\n"
                     f"gw.acme@site-1:{hashed}  \n".encode())
    credentials = CredentialsFile.load(path)
    assert len(credentials) == 2 and "pump-7" in credentials
    assert credentials.get("gw.acme@site-1") == hashed
    assert credentials.get("nobody") is None


@pytest.mark.parametrize(("text", "where", "message"), [
    ("# ok\npump-7\n", ":2:", "expected username:hash"),
    ("pump-7:$scrypt$nope\n", ":1:", "user 'pump-7': expected $scheme$params$salt$hash"),
    (":{h}\n", ":1:", "empty user name"),
    (" pump:{h}\n", ":1:", "white space"),
    ("a:{h}\n\nb:{h}\na:{h}\n", ":4:", "user 'a' repeated (first on line 1)"),
])
def test_credentials_file_errors_name_file_and_line(tmp_path: Path, text: str, where: str,
                                                     message: str) -> None:
    path = tmp_path / "creds"
    path.write_text(text.format(h=fast_hash("pw")))
    with pytest.raises(CredentialsError) as caught:
        CredentialsFile.load(path)
    assert str(caught.value).startswith(f"{path}{where} ")
    assert message in str(caught.value)


def test_credentials_file_unreadable_or_not_utf8(tmp_path: Path) -> None:
    with pytest.raises(CredentialsError, match="no such file"):
        CredentialsFile.load(tmp_path / "missing")
    assert len(CredentialsFile.load(tmp_path / "missing", missing_ok=True)) == 0
    (tmp_path / "latin1").write_bytes(b"# ok\nj\xf6rg:x\n")
    with pytest.raises(CredentialsError, match=r"latin1:2: not UTF-8"):
        CredentialsFile.load(tmp_path / "latin1")


def test_save_is_atomic_private_and_keeps_comments(tmp_path: Path) -> None:
    path = tmp_path / "creds"
    path.write_text(f"# fleet A\na:{fast_hash('a')}\n# fleet B\nb:{fast_hash('b')}\n")
    path.chmod(0o644)
    credentials = CredentialsFile.load(path)
    assert credentials.set("a", fast_hash("a2")) is False
    assert credentials.set("c", fast_hash("c")) is True
    assert credentials.delete("b") and not credentials.delete("b")
    credentials.save()
    lines = path.read_text().splitlines()
    assert [line.split(":")[0] for line in lines] == ["# fleet A", "a", "# fleet B", "c"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["creds"]  # no temp file left
    reread = CredentialsFile.load(path)
    assert verify_password(reread.get("a") or "", b"a2")


def test_failed_atomic_write_keeps_the_old_file(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "creds"
    path.write_text("old\n")

    def fail(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError):
        write_atomically(path, b"new\n")
    assert path.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["creds"]


# --------------------------------------------------------------------------- authenticator


class CountingExecutor(Executor):
    """Runs jobs in threads; counts them and the most that ran at once; can hold them."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(8)
        self._lock = threading.Lock()
        self.gate = threading.Event()
        self.gate.set()
        self.submitted = 0
        self.running = 0
        self.most_running = 0

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        self.submitted += 1

        def job() -> Any:
            with self._lock:
                self.running += 1
                self.most_running = max(self.most_running, self.running)
            try:
                self.gate.wait(10)
                return fn(*args, **kwargs)
            finally:
                with self._lock:
                    self.running -= 1

        return self._pool.submit(job)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._pool.shutdown(wait, cancel_futures=cancel_futures)


@pytest.fixture
def executor() -> Iterator[CountingExecutor]:
    pool = CountingExecutor()
    yield pool
    pool.gate.set()
    pool.shutdown()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def authenticator(path: Path, **options: Any) -> Authenticator:
    return Authenticator(credentials=CredentialsFile.load(path), **options)


async def test_password_login_gives_identity_with_tenant(tmp_path: Path) -> None:
    creds = write_credentials(tmp_path / "creds", {"pump-7": "s3cret", "other": "x"})
    authn = authenticator(creds, tenants={"pump-7": "acme"})
    result = await authn.authenticate("pump-7", b"s3cret", client_id="pump-7-a",
                                      peer_cert_identity=None)
    assert result.ok and result.reason_code == 0
    assert result.identity == Identity(username="pump-7", client_id="pump-7-a", tenant="acme",
                                       device="pump-7-a")
    other = await authn.authenticate("other", b"x", client_id="o", peer_cert_identity=None)
    assert other.identity is not None and other.identity.tenant == "default"


@pytest.mark.parametrize(("username", "password", "code"), [
    ("pump-7", b"wrong", 0x86),
    ("nobody", b"s3cret", 0x86),
    ("pump-7", None, 0x86),
    (None, b"s3cret", 0x86),
    (None, None, 0x87),  # anonymous, not allowed
])
async def test_refusals_carry_mqtt5_reason_codes(tmp_path: Path, username: str | None,
                                                 password: bytes | None, code: int) -> None:
    authn = authenticator(write_credentials(tmp_path / "creds", {"pump-7": "s3cret"}))
    result = await authn.authenticate(username, password, client_id="c", peer_cert_identity=None)
    assert (result.ok, result.reason_code, result.identity) == (False, code, None)
    assert result.reason


async def test_anonymous_only_when_allowed() -> None:
    refused = await Authenticator().authenticate(None, None, client_id="c",
                                                 peer_cert_identity=None)
    assert refused.reason_code == 0x87
    allowed = await Authenticator(allow_anonymous=True, default_tenant="public").authenticate(
        None, None, client_id="c", peer_cert_identity=None)
    assert allowed.identity == Identity(username=None, client_id="c", tenant="public",
                                        device="c")


async def test_user_name_without_credentials_file_proves_nothing() -> None:
    # Where anyone may connect it is a label (classification rules may use it), but it must
    # not pick the tenant: an anonymous client cannot choose its own.
    authn = Authenticator(allow_anonymous=True, tenants={"acme-admin": "acme"},
                          default_tenant="public")
    result = await authn.authenticate("acme-admin", b"x", client_id="c", peer_cert_identity=None)
    assert result.ok and result.identity is not None
    assert (result.identity.username, result.identity.tenant) == ("acme-admin", "public")
    # Where nobody may connect anonymously, a user name without a file to check it is refused.
    closed = Authenticator(tenants={"acme-admin": "acme"})
    refused = await closed.authenticate("acme-admin", b"x", client_id="c",
                                        peer_cert_identity=None)
    assert refused.reason_code == 0x86


async def test_enhanced_authentication_is_refused() -> None:
    result = await Authenticator(allow_anonymous=True).authenticate(
        None, None, client_id="c", peer_cert_identity=None, authentication_method="SCRAM-SHA-1")
    assert result.reason_code == 0x8C


async def test_reconnects_are_verified_from_the_cache_failures_never_are(
        tmp_path: Path, executor: CountingExecutor) -> None:
    authn = authenticator(write_credentials(tmp_path / "creds", {"pump-7": "s3cret"}))

    async def login(password: bytes) -> int:
        result = await authn.authenticate("pump-7", password, client_id="c",
                                          peer_cert_identity=None, loop_executor=executor)
        return result.reason_code

    assert await login(b"s3cret") == 0
    for _ in range(1000):  # a reconnect storm: no hash at all
        assert await login(b"s3cret") == 0
    assert executor.submitted == 1 and authn.cached == 1
    for _ in range(3):  # a wrong password is hashed every time, and not remembered
        assert await login(b"guess") == 0x86
    assert executor.submitted == 4
    assert await login(b"s3cret") == 0 and executor.submitted == 4


async def test_cache_is_bounded(tmp_path: Path) -> None:
    users = {f"u{i}": "pw" for i in range(3)}
    authn = authenticator(write_credentials(tmp_path / "creds", users), cache_size=2)
    for user in users:
        await authn.authenticate(user, b"pw", client_id=user, peer_cert_identity=None)
    assert authn.cached == 2
    off = authenticator(tmp_path / "creds", cache_size=0)
    await off.authenticate("u0", b"pw", client_id="c", peer_cert_identity=None)
    assert off.cached == 0


async def test_a_changed_file_is_reloaded_and_the_cache_forgotten(tmp_path: Path) -> None:
    path = write_credentials(tmp_path / "creds", {"pump-7": "old"})
    clock = Clock()
    authn = authenticator(path, clock=clock, check_interval_s=2.0)
    assert (await authn.authenticate("pump-7", b"old", client_id="c",
                                     peer_cert_identity=None)).ok
    credentials = CredentialsFile.load(path)
    credentials.set("pump-7", fast_hash("new"))
    credentials.save()
    clock.now += 2.0
    assert (await authn.authenticate("pump-7", b"old", client_id="c",
                                     peer_cert_identity=None)).reason_code == 0x86
    assert (await authn.authenticate("pump-7", b"new", client_id="c",
                                     peer_cert_identity=None)).ok


async def test_a_check_that_straddles_a_reload_is_not_remembered(
        tmp_path: Path, executor: CountingExecutor) -> None:
    path = write_credentials(tmp_path / "creds", {"pump-7": "old"})
    authn = authenticator(path)
    executor.gate.clear()
    attempt = asyncio.create_task(authn.authenticate(
        "pump-7", b"old", client_id="c", peer_cert_identity=None, loop_executor=executor))
    await asyncio.sleep(0.05)
    write_credentials(path, {"pump-7": "new"})
    assert await authn.reload_credentials()
    executor.gate.set()
    assert (await attempt).ok  # checked against the credentials of when it arrived
    assert authn.cached == 0
    assert (await authn.authenticate("pump-7", b"old", client_id="c",
                                     peer_cert_identity=None)).reason_code == 0x86


async def test_a_broken_file_keeps_the_previous_credentials(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write_credentials(tmp_path / "creds", {"pump-7": "pw"})
    clock = Clock()
    authn = authenticator(path, clock=clock)
    path.write_text("pump-7 has no hash\n")
    clock.now += 10
    with caplog.at_level(logging.WARNING, logger="gateway.auth"):
        assert (await authn.authenticate("pump-7", b"pw", client_id="c",
                                         peer_cert_identity=None)).ok
        clock.now += 10
        await authn.authenticate("pump-7", b"pw", client_id="c", peer_cert_identity=None)
    assert [r.message for r in caplog.records].count(
        f"keeping the previous credentials: {path}:1: expected username:hash") == 1


async def test_hashes_are_limited_and_the_overflow_told_server_busy(
        tmp_path: Path, executor: CountingExecutor) -> None:
    authn = authenticator(write_credentials(tmp_path / "creds", {"pump-7": "pw"}),
                          max_concurrent_hashes=2, max_waiting_hashes=1)
    executor.gate.clear()  # hold the hashes, as a slow scrypt under attack would
    attempts = [asyncio.create_task(authn.authenticate(
        "pump-7", b"guess", client_id=f"c{i}", peer_cert_identity=None, loop_executor=executor))
        for i in range(3)]
    await asyncio.sleep(0.05)
    busy = await authn.authenticate("pump-7", b"guess", client_id="c3",
                                    peer_cert_identity=None, loop_executor=executor)
    assert busy.reason_code == 0x89
    executor.gate.set()
    assert [r.reason_code for r in await asyncio.gather(*attempts)] == [0x86] * 3
    assert executor.most_running == 2


async def test_client_certificates_identify_clients() -> None:
    authn = Authenticator(tenants={"device-7": "acme"})
    by_cert = await authn.authenticate(None, None, client_id="c", peer_cert_identity="device-7")
    assert by_cert.identity == Identity(username="device-7", client_id="c", tenant="acme",
                                        device="c")
    pinned = Authenticator(tenants={"device-7": "acme"}, device_id="certificate")
    result = await pinned.authenticate(None, None, client_id="c", peer_cert_identity="device-7")
    assert result.identity is not None and result.identity.device == "device-7"
    no_cert = await pinned.authenticate(None, None, client_id="c", peer_cert_identity=None)
    assert no_cert.reason_code == 0x87


# --------------------------------------------------------------------------- passwd command


def passwd(*args: str, input: str | None = None) -> Any:
    return CliRunner().invoke(passwd_command, list(args), input=input)


def test_passwd_adds_changes_and_removes_users(tmp_path: Path) -> None:
    path = tmp_path / "creds"
    result = passwd(str(path), "pump-7", "--password-stdin", input="first pw\n")
    assert result.exit_code == 0, result.output
    assert "added 'pump-7'" in result.output
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    result = passwd(str(path), "pump-7", input="second\nsecond\n")  # prompted twice
    assert result.exit_code == 0 and "changed the password of 'pump-7'" in result.output
    assert result.output.count("Password") == 1 and "Repeat password" in result.output
    assert passwd(str(path), "pump-8", "--scheme", "pbkdf2-sha256", "--password-stdin",
                  input="third\r\n").exit_code == 0
    credentials = CredentialsFile.load(path)
    assert verify_password(credentials.get("pump-7") or "", b"second")
    assert (credentials.get("pump-8") or "").startswith("$pbkdf2-sha256$600000$")
    assert verify_password(credentials.get("pump-8") or "", b"third")
    result = passwd(str(path), "pump-7", "--delete")
    assert result.exit_code == 0 and "removed 'pump-7'" in result.output
    assert "pump-7" not in CredentialsFile.load(path)


@pytest.mark.parametrize(("args", "input", "message"), [
    (["a:b"], None, "cannot contain ':'"),
    (["#a"], None, "cannot start with '#'"),
    (["pump-7", "--delete", "--password-stdin"], "x\n", "--delete takes no password"),
    (["pump-7", "--password-stdin"], "", "no password on the first line"),
    (["pump-7", "--password-stdin"], "\n", "no password on the first line"),
    (["pump-7", "--scheme", "md5"], None, "'md5' is not one of"),
])
def test_passwd_usage_errors_exit_2(tmp_path: Path, args: list[str], input: str | None,
                                    message: str) -> None:
    result = passwd(str(tmp_path / "creds"), *args, input=input)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not (tmp_path / "creds").exists()


def test_passwd_runtime_failures_exit_1(tmp_path: Path) -> None:
    path = tmp_path / "creds"
    result = passwd(str(path), "pump-7", input="one\ntwo\n")
    assert result.exit_code == 1 and "do not match" in result.output
    result = passwd(str(path), "pump-7", "--delete")
    assert result.exit_code == 1 and "no such file" in result.output
    write_credentials(path, {"pump-7": "pw"})
    result = passwd(str(path), "pump-9", "--delete")
    assert result.exit_code == 1 and "no user 'pump-9'" in result.output
    path.write_text("broken line\n")
    result = passwd(str(path), "pump-7", "--password-stdin", input="pw\n")
    assert result.exit_code == 1 and f"{path}:1: expected username:hash" in result.output
    result = passwd(str(tmp_path / "no-dir" / "creds"), "pump-7", "--password-stdin",
                    input="pw\n")
    assert result.exit_code == 1 and "cannot write" in result.output


# --------------------------------------------------------------------------- TLS


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def client_context(pki: Pki, cert: Path | None = None, key: Path | None = None
                   ) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.ca))
    if cert is not None:
        context.load_cert_chain(cert, key)
    return context


async def tls_exchange(server_context: ssl.SSLContext,
                       client: ssl.SSLContext) -> tuple[list[dict[str, Any]], bytes]:
    """One connection over loopback: (the peer certificates the server saw, the bytes the
    client got back; empty if the handshake failed)."""
    seen: list[dict[str, Any]] = []

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(writer.get_extra_info("peercert"))
        writer.write(b"hi")
        await writer.drain()
        writer.close()
        await writer.wait_closed()

    server = await asyncio.start_server(on_client, "127.0.0.1", 0, ssl=server_context)
    port = server.sockets[0].getsockname()[1]
    got = b""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(
            "127.0.0.1", port, ssl=client, server_hostname="localhost"), 10)
        try:
            got = await asyncio.wait_for(reader.read(2), 10)
        finally:
            writer.close()
            with contextlib.suppress(ssl.SSLError, ConnectionError):
                await writer.wait_closed()
    except (ssl.SSLError, ConnectionError):
        pass
    finally:
        server.close()
        await server.wait_closed()
    return seen, got


async def test_tls_handshake_with_a_client_certificate(pki: Pki) -> None:
    server = server_ssl_context(pki.server_cert, pki.server_key, pki.ca,
                                require_client_cert=True)
    seen, got = await tls_exchange(server, client_context(pki, pki.client_cert, pki.client_key))
    assert got == b"hi"
    assert identity_from_certificate(seen[0], "cn") == "device-7"
    assert identity_from_certificate(seen[0], "san") == "urn:dev:acme:device-7"


async def test_tls_without_client_certificates(pki: Pki) -> None:
    server = server_ssl_context(pki.server_cert, pki.server_key)
    seen, got = await tls_exchange(server, client_context(pki))
    assert got == b"hi" and identity_from_certificate(seen[0], "cn") is None
    optional = server_ssl_context(pki.server_cert, pki.server_key, pki.ca)
    seen, got = await tls_exchange(optional, client_context(pki))
    assert got == b"hi" and identity_from_certificate(seen[0], "cn") is None


@pytest.mark.parametrize("which", ["none", "rogue"])
async def test_tls_refuses_missing_or_untrusted_client_certificates(pki: Pki,
                                                                     which: str) -> None:
    server = server_ssl_context(pki.server_cert, pki.server_key, pki.ca,
                                require_client_cert=True)
    client = client_context(pki) if which == "none" else client_context(
        pki, pki.rogue_cert, pki.rogue_key)
    seen, got = await tls_exchange(server, client)
    assert (seen, got) == ([], b"")


async def test_tls_refuses_versions_below_1_2(pki: Pki) -> None:
    server = server_ssl_context(pki.server_cert, pki.server_key)
    assert server.minimum_version == ssl.TLSVersion.TLSv1_2
    old = client_context(pki)
    with warnings.catch_warnings():  # "TLSv1_1 is deprecated": that is the point
        warnings.simplefilter("ignore", DeprecationWarning)
        old.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
        old.maximum_version = ssl.TLSVersion.TLSv1_1
    old.set_ciphers("DEFAULT:@SECLEVEL=0")
    assert await tls_exchange(server, old) == ([], b"")


def test_server_ssl_context_needs_a_ca_to_require_client_certs(pki: Pki) -> None:
    with pytest.raises(ValueError, match="cafile"):
        server_ssl_context(pki.server_cert, pki.server_key, require_client_cert=True)
    with pytest.raises(ssl.SSLError):
        server_ssl_context(pki.server_cert, pki.client_key)  # key of another certificate


@pytest.mark.parametrize(("peercert", "use", "expected"), [
    ({"subject": ((("organizationName", "acme"),), (("commonName", "d1"),))}, "cn", "d1"),
    ({"subject": ((("commonName", "d1"),), (("commonName", "d2"),))}, "cn", None),
    ({"subject": ((("commonName", ""),),)}, "cn", None),
    ({"subjectAltName": (("IP Address", "10.0.0.1"), ("URI", "urn:d1"), ("DNS", "d1"))},
     "san", "urn:d1"),
    ({"subject": ((("commonName", "d1"),),)}, "san", None),
    ({}, "cn", None),
    (None, "san", None),
])
def test_identity_from_certificate(peercert: dict[str, Any] | None, use: auth.CertificateIdentity,
                                   expected: str | None) -> None:
    assert identity_from_certificate(peercert, use) == expected


# --------------------------------------------------------------------------- ACL


def rule(topic: str, action: str = "both", permission: str = "allow", **selectors: str) -> AclRule:
    return AclRule(topic=topic, action=action, permission=permission,  # type: ignore[arg-type]
                   **selectors)


def ident(client_id: str = "a-dev-1", tenant: str = "acme", username: str | None = "a-user",
          device: str | None = None) -> Identity:
    return Identity(username=username, client_id=client_id, tenant=tenant,
                    device=device if device is not None else client_id)


def test_acl_substitutes_identity_into_patterns() -> None:
    acl = Acl([rule("tenants/%t/devices/%c/#"),
               rule("tenants/%t/users/%u/in", action="publish"),
               rule("tenants/%t/broadcast/+", action="subscribe"),
               rule("by-device/%d/100%%", action="publish")])
    me = ident(device="pump-7")
    assert acl.can_publish(me, "tenants/acme/devices/a-dev-1/temp")
    assert acl.can_publish(me, "tenants/acme/devices/a-dev-1")  # "#" includes the parent
    assert acl.can_subscribe(me, "tenants/acme/devices/a-dev-1/#")
    assert acl.can_publish(me, "tenants/acme/users/a-user/in")
    assert not acl.can_subscribe(me, "tenants/acme/users/a-user/in")  # publish only
    assert acl.can_subscribe(me, "tenants/acme/broadcast/+")
    assert not acl.can_publish(me, "tenants/acme/broadcast/x")  # subscribe only
    assert acl.can_publish(me, "by-device/pump-7/100%")
    assert not acl.can_publish(me, "tenants/acme/devices/a-dev-2/temp")


def test_first_match_wins_and_nothing_matching_denies() -> None:
    acl = Acl([rule("site/%c/#"),
               rule("site/+/secrets/#", permission="deny"),
               rule("site/#", action="subscribe")])
    me = ident(client_id="d1")
    assert acl.can_publish(me, "site/d1/secrets/key")  # its own: the first rule decides
    assert acl.can_subscribe(me, "site/d2/temp")
    assert not acl.can_subscribe(me, "site/d2/secrets/key")
    assert not acl.can_subscribe(me, "site/#")  # it would receive other devices' secrets
    assert not acl.can_subscribe(me, "site/+/+/key")
    assert acl.can_subscribe(me, "site/+/temp")
    assert not acl.can_publish(me, "site/d2/temp")  # subscribe only, then nothing: deny
    assert not acl.can_publish(me, "elsewhere")


def test_no_rules_allow_every_valid_topic_and_filter() -> None:
    acl = Acl([])
    me = ident()
    assert acl.can_publish(me, "any/topic") and acl.can_subscribe(me, "#")
    assert acl.can_subscribe(me, "$share/g/+/x")
    for bad in ("", "a/+", "a/#", "a\0b"):
        assert not acl.can_publish(me, bad)
    for bad in ("", "a/#/b", "a+/b", "a/b#", "$share/g", "$share//a", "$share/g+/a"):
        assert not acl.can_subscribe(me, bad)


def test_shared_subscriptions_are_judged_by_their_inner_filter() -> None:
    acl = Acl([rule("jobs/%t/#", action="subscribe")])
    me = ident()
    assert acl.can_subscribe(me, "$share/workers/jobs/acme/#")
    assert not acl.can_subscribe(me, "$share/workers/jobs/#")
    assert not acl.can_subscribe(me, "$share/jobs/acme/#")  # the group is not a level


def test_wildcards_at_the_first_level_never_reach_dollar_topics() -> None:
    acl = Acl([rule("#"), rule("$SYS/broker/uptime", action="subscribe")])
    me = ident()
    assert acl.can_subscribe(me, "#") and acl.can_subscribe(me, "+/x")
    assert not acl.can_publish(me, "$SYS/broker/load")
    assert not acl.can_subscribe(me, "$SYS/#")
    assert acl.can_subscribe(me, "$SYS/broker/uptime")


def test_rules_per_tenant_and_per_device() -> None:
    acl = Acl([rule("admin/#", device="console", tenant="acme"),
               rule("reports/%t/#", action="subscribe", tenant="acme")])
    assert acl.can_publish(ident(client_id="console"), "admin/reboot")
    assert not acl.can_publish(ident(client_id="console", tenant="globex"), "admin/reboot")
    assert not acl.can_publish(ident(client_id="pump"), "admin/reboot")
    assert acl.can_subscribe(ident(), "reports/acme/#")
    assert not acl.can_subscribe(ident(tenant="globex"), "reports/globex/#")


def test_bound_acls_are_reused_and_bounded() -> None:
    acl = Acl([rule("x/%c")], max_identities=2)
    a, b, c = ident("a"), ident("b"), ident("c")
    assert acl.bind(a) is acl.bind(a)
    acl.bind(b)
    acl.bind(c)
    assert len(acl._bound) == 2 and a not in acl._bound
    bound = acl.bind(a)
    for i in range(3000):  # decisions are remembered, within a bound
        bound.can_publish(f"x/{i}")
    assert len(bound._pub_cache) <= 1024


# Tenant isolation: acme's devices must not read or write globex's topics, whatever they try.

ISOLATION_RULES = [
    rule("tenants/%t/devices/%c/#"),
    rule("tenants/%t/devices/+/secrets/#", permission="deny"),
    rule("tenants/%t/broadcast/#", action="subscribe"),
    rule("tenants/%t/ingest/%u", action="publish"),
    rule("tenants/%t/users/%u/#", action="subscribe"),
]
GLOBEX_TOPICS = [
    "tenants/globex/devices/b-dev-1/temp",
    "tenants/globex/devices/a-dev-1/temp",  # acme's device name, globex's tree
    "tenants/globex/devices/b-dev-1/secrets/key",
    "tenants/globex/broadcast/firmware",
    "tenants/globex/ingest/a-user",
    "tenants/globex/users/a-user/inbox",
    "tenants/globex",
    "tenants/globex/",
    "tenants/globex/devices/b-dev-1/",
    "tenants/globex//devices/b-dev-1",
]
# Names a device of acme may pick for itself, or be given by a broken registry: none may
# widen "tenants/%t/devices/%c/#" into globex's tree.
HOSTILE_VALUES = ["+", "#", "a/b", "globex/devices/b-dev-1", "..", "../globex", "%c", "%t",
                  "%u", "", "$SYS", "a+", "a#", "a\0b", "globex"]


def _filters_reaching(topic: str) -> Iterator[str]:
    """Every filter that matches ``topic``: each level kept or "+", optionally cut by "#"
    at any level; and each of them as a shared subscription."""
    levels = topic.split("/")
    for cut in range(len(levels) + 1):
        for mask in itertools.product((False, True), repeat=cut):
            head = ["+" if wild else level for wild, level in zip(mask, levels[:cut], strict=True)]
            candidates = [[*head, "#"]] + ([head] if cut == len(levels) else [])
            for candidate in candidates:
                topic_filter = "/".join(candidate)
                assert compile_topic_filter(topic_filter).match(topic)
                yield topic_filter
                yield f"$share/g/{topic_filter}"


def _acme_identities() -> Iterator[Identity]:
    yield ident()
    yield ident(client_id="b-dev-1")  # the same device name as in globex
    for value in HOSTILE_VALUES:
        yield ident(client_id=value)
        yield ident(username=value)
        yield ident(device=value)
        yield ident(client_id=value, username=value)
    yield ident(username=None)


def test_tenant_isolation_every_way() -> None:
    acl = Acl(ISOLATION_RULES)
    checked = 0
    for me in _acme_identities():
        for topic in GLOBEX_TOPICS:
            assert not acl.can_publish(me, topic), (me, topic)
            for topic_filter in _filters_reaching(topic):
                assert not acl.can_subscribe(me, topic_filter), (me, topic_filter)
                checked += 1
    assert checked > 50_000
    # The same identities with hostile values in tenant: never anything of globex either.
    for value in HOSTILE_VALUES:
        if value == "globex":
            continue  # that is globex itself
        me = ident(tenant=value)
        for topic in GLOBEX_TOPICS:
            assert not acl.can_publish(me, topic), (me, topic)
            assert not any(acl.can_subscribe(me, f) for f in _filters_reaching(topic)), me
    # And acme's own device still works, so the refusals above are not a blanket deny.
    me = ident()
    assert acl.can_publish(me, "tenants/acme/devices/a-dev-1/temp")
    assert acl.can_publish(me, "tenants/acme/ingest/a-user")
    assert acl.can_subscribe(me, "tenants/acme/devices/a-dev-1/#")
    assert acl.can_subscribe(me, "$share/g/tenants/acme/broadcast/+")
    assert acl.can_subscribe(me, "tenants/acme/users/a-user/#")
    assert not acl.can_subscribe(me, "tenants/acme/devices/+/temp")  # other acme devices


@pytest.mark.parametrize("value", ["+", "#", "a/b", "", "$SYS"])
def test_an_unsafe_value_in_a_deny_rule_denies_everything(value: str) -> None:
    acl = Acl([rule("tenants/%t/devices/%c/secrets", permission="deny"),
               rule("tenants/%t/#")])
    me = ident(client_id=value)
    assert not acl.can_publish(me, "tenants/acme/anything")
    assert not acl.can_subscribe(me, "tenants/acme/anything")
    assert acl.can_publish(ident(), "tenants/acme/anything")


def test_placeholder_text_in_a_value_is_not_substituted_again() -> None:
    acl = Acl([rule("u/%u/c/%c")])
    me = ident(username="%c", client_id="%u")
    assert acl.can_publish(me, "u/%c/c/%u")
    assert not acl.can_publish(me, "u/%u/c/%c")


LEVELS = ["a", "b", "", "$s"]
TOPICS = ["/".join(t) for n in range(1, 5) for t in itertools.product(LEVELS, repeat=n)
          if t != ("",)]  # a topic name has at least one character
pattern_levels = st.lists(st.sampled_from([*LEVELS, "+"]), min_size=0, max_size=3)


@st.composite
def topic_filters(draw: st.DrawFn) -> str:
    levels = draw(pattern_levels)
    if not levels or levels == [""] or draw(st.booleans()):
        levels.append("#")
    return "/".join(levels)


@settings(max_examples=400, deadline=None)
@example(rules=[("a", True)], topic_filter="a/#")
@example(rules=[("a/+/#", False), ("a/#", True)], topic_filter="a/+")
@given(rules=st.lists(st.tuples(topic_filters(), st.booleans()), min_size=1, max_size=3),
       topic_filter=topic_filters())
def test_a_granted_subscription_never_reaches_a_topic_that_is_not_allowed(
        rules: list[tuple[str, bool]], topic_filter: str) -> None:
    acl = Acl([rule(p, permission="allow" if allow else "deny") for p, allow in rules])
    me = ident()
    if acl.can_subscribe(me, topic_filter):
        matcher = compile_topic_filter(topic_filter)
        for topic in TOPICS:
            if matcher.match(topic):
                assert acl.can_publish(me, topic), (topic_filter, topic)


SMALL_FILTERS = sorted({"/".join(f) for n in range(1, 4)
                        for f in itertools.product(["a", "", "$s", "+", "#"], repeat=n)
                        if "#" not in f[:-1] and f != ("",)})


def _matches(topic_filter: str) -> frozenset[str]:
    """The topics ``topic_filter`` matches, counting "" (no valid topic, but "/#" matches it
    as the parent of "/": the checks treat it as a topic, which errs on the safe side)."""
    matcher = compile_topic_filter(topic_filter)
    return frozenset(t for t in [*TOPICS, ""] if matcher.match(t))


def test_subscription_decisions_are_exact_for_one_rule() -> None:
    """Every pair of small filters: an allow rule grants exactly the filters inside it; a
    deny rule refuses exactly the filters that overlap it."""
    me = ident()
    matched = {f: _matches(f) for f in SMALL_FILTERS}
    for pattern, topic_filter in itertools.product(SMALL_FILTERS, repeat=2):
        inside = matched[topic_filter] <= matched[pattern]
        assert Acl([rule(pattern)]).can_subscribe(me, topic_filter) == inside, \
            (pattern, topic_filter)
        overlaps = bool(matched[topic_filter] & matched[pattern])
        acl = Acl([rule(pattern, permission="deny"), rule(topic_filter)])
        assert acl.can_subscribe(me, topic_filter) == (not overlaps), (pattern, topic_filter)


@pytest.mark.parametrize(("topic", "message"), [
    ("a/%x", "unknown placeholder %x"),
    ("a/%", "unknown placeholder %"),
    ("a/#/b", "'#' must be last"),
    ("a/x%c+", "a wildcard must be a whole level"),
])
def test_invalid_acl_patterns_name_the_rule(topic: str, message: str) -> None:
    with pytest.raises(ValueError, match=r"acl\[1\]\.topic: .*" + re.escape(message)):
        Acl([rule("ok/#"), rule(topic)])


# --------------------------------------------------------------------------- rate limits


def test_token_bucket_returns_the_wait_to_pay_its_debt() -> None:
    bucket = TokenBucket(rate=10, burst=5, now=0.0)
    assert [bucket.consume(1, 0.0) for _ in range(5)] == [0.0] * 5
    assert bucket.consume(1, 0.0) == pytest.approx(0.1)
    assert bucket.consume(0, 0.1) == 0.0  # the debt is paid
    assert bucket.consume(20, 10.0) == pytest.approx(1.5)  # a big read: refill capped at 5
    assert bucket.consume(1, 9.0) > 0  # time going backwards refills nothing
    with pytest.raises(ValueError):
        TokenBucket(rate=0, burst=1, now=0)


def test_client_rate_limiter_waits_for_the_slower_bucket() -> None:
    limits = LimitsSection(messages_per_s=100, bytes_per_s=1000, burst_s=1.0)
    limiter = ClientRateLimiter(limits, now=0.0)
    assert limiter.consume(50, 500, 0.0) == 0.0
    assert limiter.consume(10, 1500, 0.0) == pytest.approx(1.0)  # bytes: 1000 in debt
    only_messages = ClientRateLimiter(LimitsSection(messages_per_s=2), now=0.0)
    assert only_messages.consume(4, 10**9, 0.0) == pytest.approx(1.0)


def test_connection_flood_guard_per_address_with_bounded_memory() -> None:
    guard = ConnectionFloodGuard(max_per_window=3, window_s=1.0, max_addresses=100)
    assert [guard.allow("10.0.0.1", 0.0) for _ in range(4)] == [True, True, True, False]
    assert guard.allow("10.0.0.2", 0.0)  # another address has its own budget
    assert not guard.allow("10.0.0.1", 0.2)
    assert guard.allow("10.0.0.1", 0.34)  # a third of the window: one connection back
    for i in range(1000):  # a scan from many addresses, one connection each
        guard.allow(f"10.1.{i // 256}.{i % 256}", 5.0 + i / 1000)
    assert len(guard) <= 100
    guard.allow("10.9.9.9", 100.0)  # everything before is a window old: forgotten
    assert len(guard) == 1


# --------------------------------------------------------------------------- [auth] config


class Root(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    auth: AuthSection = AuthSection()


EXAMPLE = """
[auth]
credentials_file = "credentials"
default_tenant = "default"

[[auth.users]]
username = "pump-7"
tenant = "acme"

[[auth.users]]
username = "device-7"            # a client certificate's identity
tenant = "acme"

[[auth.acl]]                      # each device: its own subtree
topic = "tenants/%t/devices/%c/#"
action = "both"

[[auth.acl]]                      # nobody else's secrets
topic = "tenants/%t/devices/+/secrets/#"
action = "both"
permission = "deny"

[[auth.acl]]                      # acme's dashboards read the rest of acme
topic = "tenants/%t/#"
action = "subscribe"
tenant = "acme"

[auth.tls]
listen = "127.0.0.1:0"
certfile = "server.pem"
keyfile = "server.key"
cafile = "ca.pem"
identity = "san"

[auth.limits]
messages_per_s = 200
bytes_per_s = 1_000_000
burst_s = 2.0
connections_per_s_per_address = 2.5
"""


def decode(text: str) -> AuthSection:
    return msgspec.toml.decode(text, type=Root).auth


async def test_the_documented_example_builds_and_works(pki: Pki) -> None:
    write_credentials(pki.root / "credentials", {"pump-7": "pw"})
    security = build_security(decode(EXAMPLE), pki.root)
    assert security.tls is not None
    assert (security.tls.host, security.tls.port) == ("127.0.0.1", 0)
    assert security.tls.context.verify_mode == ssl.CERT_OPTIONAL
    result = await security.authenticator.authenticate("pump-7", b"pw", client_id="pump-7",
                                                       peer_cert_identity=None)
    assert result.identity is not None and result.identity.tenant == "acme"
    acl = security.acl.bind(result.identity)
    assert acl.can_publish("tenants/acme/devices/pump-7/secrets/key")
    assert acl.can_subscribe("tenants/acme/+/+/temp")
    assert not acl.can_subscribe("tenants/acme/#")  # would include other devices' secrets
    assert not acl.can_publish("tenants/acme/devices/pump-8/temp")
    limiter = security.client_rate_limiter(now=0.0)
    assert limiter is not None and limiter.consume(400, 100, 0.0) == 0.0
    assert limiter.consume(1, 0, 0.0) > 0
    guard = security.flood_guard
    assert guard is not None and (guard.max_per_window, guard.window_s) == (3, 1.2)


def test_defaults_need_a_way_in() -> None:
    assert AuthSection().allow_anonymous is False
    with pytest.raises(ConfigError, match="auth: no client could connect"):
        build_security(AuthSection(), ".")
    security = build_security(decode("[auth]\nallow_anonymous = true\n"), ".")
    assert security.tls is None and security.flood_guard is None
    assert security.client_rate_limiter(now=0.0) is None


@pytest.mark.parametrize(("toml", "message"), [
    ('[auth]\nallow_anonymous = true\n[[auth.users]]\nusername = "a"\ntenant = "t"\n'
     '[[auth.users]]\nusername = "a"\ntenant = "u"\n',
     "auth.users[1].username: 'a' is already auth.users[0]"),
    ('[auth]\nallow_anonymous = true\n[[auth.acl]]\ntopic = "a"\naction = "publish"\n'
     '[[auth.acl]]\ntopic = "t/%t/#/x"\naction = "both"\n',
     "auth.acl[1].topic: invalid topic filter 't/x/#/x': '#' must be last"),
    ('[auth]\ncredentials_file = "missing"\n', "auth.credentials_file: {dir}/missing: cannot "
                                                "read: no such file"),
    ('[auth]\ncredentials_file = "bad"\n', "auth.credentials_file: {dir}/bad:1: expected "
                                            "username:hash"),
    ('[auth.tls]\ncertfile = "nope.pem"\nkeyfile = "server.key"\ncafile = "ca.pem"\n',
     "auth.tls.certfile: cannot read {dir}/nope.pem: no such file"),
    ('[auth.tls]\ncertfile = "server.pem"\nkeyfile = "client.key"\ncafile = "ca.pem"\n',
     "auth.tls.certfile: cannot load {dir}/server.pem with key {dir}/client.key"),
    ('[auth.tls]\ncertfile = "server.pem"\nkeyfile = "server.key"\ncafile = "bad"\n',
     "auth.tls.cafile: cannot load {dir}/bad"),
    ('[auth]\nallow_anonymous = true\n[auth.tls]\ncertfile = "server.pem"\n'
     'keyfile = "server.key"\nrequire_client_cert = true\n',
     "auth.tls.require_client_cert: needs auth.tls.cafile"),
    ('[auth.tls]\nlisten = "8883"\ncertfile = "server.pem"\nkeyfile = "server.key"\n'
     'cafile = "ca.pem"\n', "auth.tls.listen: expected HOST:PORT, got '8883'"),
    ('[auth]\nallow_anonymous = true\ndevice_id = "certificate"\n',
     'auth.device_id: "certificate" needs auth.tls.require_client_cert'),
])
def test_build_errors_name_the_place(pki: Pki, toml: str, message: str) -> None:
    (pki.root / "bad").write_text("not a credentials line\n")
    with pytest.raises(ConfigError) as caught:
        build_security(decode(toml), pki.root)
    assert str(caught.value).startswith(message.format(dir=pki.root))


@pytest.mark.parametrize(("toml", "where"), [
    ("[auth]\nallow_anonymus = true\n", "auth"),
    ('[auth.tls]\ncertfile = "a"\nkeyfile = "b"\nidentity = "email"\n', "auth.tls.identity"),
    ("[auth.limits]\nmessages_per_s = 0\n", "auth.limits.messages_per_s"),
    ('[[auth.acl]]\ntopic = "a"\n', "auth.acl[0]"),
    ('[[auth.acl]]\ntopic = "a"\naction = "read"\n', "auth.acl[0].action"),
    ('[[auth.users]]\nusername = "a"\ntenant = "a/b"\n', "auth.users[0].tenant"),
])
def test_decoding_rejects_unknown_and_invalid_fields(toml: str, where: str) -> None:
    with pytest.raises(msgspec.ValidationError, match=re.escape(f"`$.{where}`")):
        decode(toml)
