"""Test certificates made with the ``openssl`` CLI: a CA, and certificates it signs.

The one certificate maker of the repository: the TLS cluster of the harness, the TLS tests
and the credential-rotation tests all use it. EC keys (P-256) because they are made in
milliseconds, where RSA keys take long enough to show in a test run.

Example:
    >>> pki = make_test_pki(Path("/tmp/pki"))  # doctest: +SKIP
    >>> pki.ca_file, pki.cert_file, pki.key_file  # doctest: +SKIP
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ._constants import HarnessError

__all__ = ["CertPair", "TlsFiles", "make_ca", "make_cert", "make_test_pki"]

_OPENSSL_TIMEOUT = 60.0
_DAYS = "2"  # test certificates: short-lived on purpose


@dataclass(frozen=True)
class CertPair:
    """A certificate and its private key, both PEM files."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class TlsFiles:
    """What a TLS cluster needs: the CA to trust and one certificate for every node.

    The node certificate names ``127.0.0.1``, ``::1`` and ``localhost`` and serves as server
    and client certificate (cluster bus and replication links present it to their peers).
    The harness's own admin clients present it too, so ``tls-auth-clients yes`` works.

    Attributes:
        ca: The test CA (its key stays beside it, to sign more certificates in tests).
        node: The certificate every node presents.
    """

    ca: CertPair
    node: CertPair

    @property
    def ca_file(self) -> Path:
        return self.ca.cert

    @property
    def cert_file(self) -> Path:
        return self.node.cert

    @property
    def key_file(self) -> Path:
        return self.node.key


def _openssl(*args: str, cwd: Path) -> None:
    if shutil.which("openssl") is None:
        raise HarnessError("openssl is missing: apt-get install openssl")
    try:
        subprocess.run(
            ["openssl", *args],
            cwd=cwd,
            check=True,
            capture_output=True,
            timeout=_OPENSSL_TIMEOUT,
        )
    except subprocess.CalledProcessError as exc:
        detail = exc.stderr.decode(errors="replace")
        raise HarnessError(f"openssl {args[0]} failed: {detail}") from exc
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise HarnessError(f"openssl {args[0]} failed: {exc!r}") from exc


_EC_KEY = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")


def make_ca(directory: Path, name: str = "ca") -> CertPair:
    """A self-signed CA: ``<name>.crt`` and ``<name>.key`` in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    pair = CertPair(directory / f"{name}.crt", directory / f"{name}.key")
    _openssl(
        "req", "-x509", *_EC_KEY,
        "-keyout", str(pair.key), "-out", str(pair.cert),
        "-days", _DAYS, "-subj", f"/CN=engine-test-{name}",
        cwd=directory,
    )  # fmt: skip
    return pair


def make_cert(
    directory: Path,
    name: str,
    ca: CertPair,
    *,
    hosts: tuple[str, ...] = ("127.0.0.1", "::1", "localhost"),
) -> CertPair:
    """A certificate signed by ``ca`` for ``hosts`` (IPs and DNS names), usable by a server
    and by a client: ``<name>.crt`` and ``<name>.key`` in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    pair = CertPair(directory / f"{name}.crt", directory / f"{name}.key")
    csr = directory / f"{name}.csr"
    ext = directory / f"{name}.ext"
    names = ",".join(
        f"IP:{h}" if h.replace(".", "").isdigit() or ":" in h else f"DNS:{h}" for h in hosts
    )
    ext.write_text(f"subjectAltName={names}\n")
    _openssl(
        "req", *_EC_KEY,
        "-keyout", str(pair.key), "-out", str(csr), "-subj", f"/CN={name}",
        cwd=directory,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", str(csr),
        "-CA", str(ca.cert), "-CAkey", str(ca.key), "-CAcreateserial",
        "-out", str(pair.cert), "-days", _DAYS, "-extfile", str(ext),
        cwd=directory,
    )  # fmt: skip
    csr.unlink(missing_ok=True)
    ext.unlink(missing_ok=True)
    return pair


def make_test_pki(directory: Path, *, host: str = "127.0.0.1") -> TlsFiles:
    """A test CA and a node certificate for ``host`` (and the loopback names) in ``directory``."""
    ca = make_ca(directory)
    hosts = tuple(dict.fromkeys((host, "127.0.0.1", "::1", "localhost")))
    return TlsFiles(ca=ca, node=make_cert(directory, "node", ca, hosts=hosts))
