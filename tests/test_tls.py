"""rediss://: the engine over TLS to a plain server with a certificate from a test CA.

The CA and the server certificate come from the harness's one certificate maker
(``engine.testing._tls``, openssl CLI); the redis-server is started and stopped here by pid.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import plain_redis_server

from engine import EngineSettings, EngineUnavailable, InvalidArgument, SessionEngine
from engine.testing import make_test_pki


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Path]]:
    d = tmp_path_factory.mktemp("tls")
    pki = make_test_pki(d)
    with plain_redis_server(
        "--tls-cert-file",
        str(pki.cert_file),
        "--tls-key-file",
        str(pki.key_file),
        "--tls-ca-cert-file",
        str(pki.ca_file),
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
