"""rediss://: the engine over TLS to a plain server with a certificate from a test CA.

The CA and the server certificate are made here with the openssl CLI; the redis-server is
started and stopped here by pid.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import plain_redis_server

from engine import EngineSettings, EngineUnavailable, InvalidArgument, SessionEngine


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Path]]:
    assert shutil.which("openssl"), "openssl is missing: apt-get install openssl"
    d = tmp_path_factory.mktemp("tls")
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "2",
        "-subj",
        "/CN=engine-test-ca",
        cwd=d,
    )
    _openssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=127.0.0.1",
        cwd=d,
    )
    (d / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _openssl(
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.crt",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
        cwd=d,
    )
    with plain_redis_server(
        "--tls-cert-file",
        str(d / "server.crt"),
        "--tls-key-file",
        str(d / "server.key"),
        "--tls-ca-cert-file",
        str(d / "ca.crt"),
        "--tls-auth-clients",
        "no",
        port_option="--tls-port",
    ) as port:
        yield port, d


async def test_engine_over_tls(tls_server: tuple[int, Path]) -> None:
    port, d = tls_server
    settings = EngineSettings(
        url=f"rediss://127.0.0.1:{port}", tls_ca_file=str(d / "ca.crt"), key_prefix="tls"
    )
    async with SessionEngine(settings) as eng:
        new = await eng.create(user_id="t")
        assert (await eng.validate(new.token)) is not None
        assert await eng.validate_many([new.token] * 100) != [None] * 100


async def test_untrusted_certificate_fails_closed(tls_server: tuple[int, Path]) -> None:
    port, _ = tls_server
    eng = SessionEngine(EngineSettings(url=f"rediss://127.0.0.1:{port}", key_prefix="tls"))
    with pytest.raises(EngineUnavailable):
        await eng.open()  # the system CAs do not know the test CA


async def test_plain_connection_to_a_tls_port_fails_closed(tls_server: tuple[int, Path]) -> None:
    port, _ = tls_server
    eng = SessionEngine(
        EngineSettings(url=f"redis://127.0.0.1:{port}", key_prefix="tls", connect_timeout=0.5)
    )
    with pytest.raises(EngineUnavailable):
        await eng.open()


def test_tls_files_need_a_rediss_url(tmp_path: Path) -> None:
    eng = SessionEngine(EngineSettings(url="redis://127.0.0.1:1", tls_ca_file=str(tmp_path)))
    with pytest.raises(InvalidArgument):
        eng._ssl_context()
