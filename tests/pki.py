"""A throwaway public-key infrastructure for TLS tests, made with the openssl command: a CA,
a server certificate for localhost, a client certificate (CN device-7) and a client of
another CA."""

from __future__ import annotations

import subprocess
from pathlib import Path


class Pki:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.ca = root / "ca.pem"
        self.server_cert, self.server_key = root / "server.pem", root / "server.key"
        self.client_cert, self.client_key = root / "client.pem", root / "client.key"
        self.rogue_cert, self.rogue_key = root / "rogue-client.pem", root / "rogue-client.key"


def _openssl(cwd: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _make_ca(cwd: Path, name: str) -> None:
    _openssl(cwd, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2",
             "-subj", f"/CN={name}", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")


def _make_cert(cwd: Path, name: str, ca: str, subject: str, extensions: str) -> None:
    (cwd / f"{name}.ext").write_text(extensions + "\nbasicConstraints=CA:FALSE\n"
                                     "authorityKeyIdentifier=keyid\n")
    _openssl(cwd, "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subject)
    _openssl(cwd, "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey",
             f"{ca}.key", "-set_serial", str(abs(hash(name)) % 10**9), "-days", "2",
             "-out", f"{name}.pem", "-extfile", f"{name}.ext")


def make_pki(root: Path) -> Pki:
    """A throwaway CA, a server and a client certificate, and a client of another CA."""
    _make_ca(root, "ca")
    _make_ca(root, "rogue-ca")
    _make_cert(root, "server", "ca", "/CN=localhost",
               "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth")
    _make_cert(root, "client", "ca", "/O=acme/CN=device-7",
               "subjectAltName=URI:urn:dev:acme:device-7,DNS:device-7.acme.example\n"
               "extendedKeyUsage=clientAuth")
    _make_cert(root, "rogue-client", "rogue-ca", "/CN=device-7", "extendedKeyUsage=clientAuth")
    return Pki(root)


