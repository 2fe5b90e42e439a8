"""Credentials that change while the engine runs: a rotated ACL password (``password_file``)
and rotated client certificate files are used at the next reconnect, with no restart.

Each rotation is made real on the server first (the old credential stops working), the
engine's connections are closed with ``CLIENT KILL``, and the engine must come back with
the new credential, which it can only have read from the files.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import ValidationError

from engine import EngineSettings, EngineUnavailable, InvalidArgument, SessionEngine
from engine._acl import acl_setuser_args
from engine.testing import LocalCluster
from engine.testing._tls import CertPair, make_ca, make_cert

pytestmark = pytest.mark.cluster

USER, PREFIX = "rotating", "rot"


@pytest.fixture(scope="module")
def cl() -> Iterator[LocalCluster]:
    # Client certificates required, as with mTLS in production.
    with LocalCluster(
        primaries=3, replicas_per_primary=0, tls=True, extra_config={"tls-auth-clients": "yes"}
    ) as cluster:
        yield cluster


def on_every_node(cl: LocalCluster, *command: str) -> None:
    for node in cl.nodes:
        cl.run(node.port, *command)


def replace_atomically(target: Path, content: bytes) -> None:
    """How a rotation should write a file: a rename, so nobody reads half of it."""
    tmp = target.with_name(target.name + ".new")
    tmp.write_bytes(content)
    os.replace(tmp, target)


async def until_ok(eng: SessionEngine, token: str, within: float = 5.0) -> float:
    """Validate until it answers (a breaker may be open from failed probes); seconds taken."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    while True:
        try:
            assert await eng.validate(token) is not None
            return loop.time() - start
        except EngineUnavailable:
            if loop.time() - start > within:
                raise
            await asyncio.sleep(0.05)


async def test_a_rotated_password_is_read_from_password_file(
    cl: LocalCluster, tmp_path: Path
) -> None:
    tls = cl.tls_files
    assert tls is not None
    on_every_node(cl, "ACL", "SETUSER", *acl_setuser_args(USER, PREFIX, password="old-pw"))
    password_file = tmp_path / "redis-password"
    password_file.write_text("old-pw\n")
    settings = EngineSettings(
        url=cl.url,
        tls_ca_file=str(tls.ca_file),
        tls_cert_file=str(tls.cert_file),
        tls_key_file=str(tls.key_file),
        username=USER,
        password_file=str(password_file),
        key_prefix=PREFIX,
        command_timeout=0.5,
    )
    async with SessionEngine(settings) as eng:
        token = (await eng.create(user_id="pw")).token
        # The server's password changes; the old one stops working at once.
        on_every_node(cl, "ACL", "SETUSER", USER, "resetpass", ">new-pw")
        on_every_node(cl, "CLIENT", "KILL", "USER", USER)
        # The file still holds the old password: reconnecting fails (the file is the source).
        with pytest.raises(EngineUnavailable):
            await eng.validate(token)
        replace_atomically(password_file, b"new-pw\n")
        await until_ok(eng, token)
        assert (await eng.create(user_id="pw")).token
        # The password never shows in the engine's settings or transport options.
        assert "new-pw" not in repr(eng.settings) + repr(eng.transport.options)
        await eng.revoke_user("pw")


async def test_rotated_client_certificate_files_are_used_on_reconnect(
    cl: LocalCluster, tmp_path: Path
) -> None:
    tls = cl.tls_files
    assert tls is not None
    # The client starts with a certificate from an outgoing CA the servers trust for now.
    outgoing = make_ca(tmp_path / "outgoing", "outgoing-ca")
    old = make_cert(tmp_path / "outgoing", "engine-client", outgoing)
    bundle = tmp_path / "trusted.pem"
    bundle.write_bytes(tls.ca_file.read_bytes() + outgoing.cert.read_bytes())
    on_every_node(cl, "CONFIG", "SET", "tls-ca-cert-file", str(bundle))
    client = CertPair(tmp_path / "client.crt", tmp_path / "client.key")
    shutil.copy(old.cert, client.cert)
    shutil.copy(old.key, client.key)
    on_every_node(cl, "ACL", "SETUSER", *acl_setuser_args(USER, PREFIX, password="pw"))
    settings = EngineSettings(
        url=cl.url,
        tls_ca_file=str(tls.ca_file),
        tls_cert_file=str(client.cert),
        tls_key_file=str(client.key),
        username=USER,
        password="pw",
        key_prefix=PREFIX,
        command_timeout=0.5,
    )
    try:
        async with SessionEngine(settings) as eng:
            token = (await eng.create(user_id="cert")).token
            # The servers stop trusting the outgoing CA; the old certificate is now refused.
            on_every_node(cl, "CONFIG", "SET", "tls-ca-cert-file", str(tls.ca_file))
            on_every_node(cl, "CLIENT", "KILL", "USER", USER)
            with pytest.raises(EngineUnavailable):
                await eng.validate(token)
            # The new certificate (from the servers' CA) lands in the same files.
            new = make_cert(tmp_path / "incoming", "engine-client", tls.ca)
            replace_atomically(client.key, new.key.read_bytes())
            replace_atomically(client.cert, new.cert.read_bytes())
            await until_ok(eng, token)
            await eng.revoke_user("cert")
    finally:
        on_every_node(cl, "CONFIG", "SET", "tls-ca-cert-file", str(tls.ca_file))


async def test_a_half_rotated_certificate_keeps_the_last_good_one(
    cl: LocalCluster, tmp_path: Path
) -> None:
    tls = cl.tls_files
    assert tls is not None
    on_every_node(cl, "ACL", "SETUSER", *acl_setuser_args(USER, PREFIX, password="pw"))
    client = CertPair(tmp_path / "client.crt", tmp_path / "client.key")
    first = make_cert(tmp_path / "a", "engine-client", tls.ca)
    shutil.copy(first.cert, client.cert)
    shutil.copy(first.key, client.key)
    settings = EngineSettings(
        url=cl.url,
        tls_ca_file=str(tls.ca_file),
        tls_cert_file=str(client.cert),
        tls_key_file=str(client.key),
        username=USER,
        password="pw",
        key_prefix=PREFIX,
    )
    async with SessionEngine(settings) as eng:
        token = (await eng.create(user_id="half")).token
        # Only the certificate is replaced: it does not match the key. The engine keeps the
        # context that loaded and reconnects with it.
        second = make_cert(tmp_path / "b", "engine-client", tls.ca)
        replace_atomically(client.cert, second.cert.read_bytes())
        on_every_node(cl, "CLIENT", "KILL", "USER", USER)
        await until_ok(eng, token)
        await eng.revoke_user("half")


def test_password_file_problems_are_clear_and_never_echo_it(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="not both"):
        EngineSettings(password="a", password_file=str(tmp_path / "f"))
    bad = tmp_path / "pw"
    bad.write_bytes(b"two\nlines-secret\n")
    eng = SessionEngine(EngineSettings(url="redis://127.0.0.1:1", password_file=str(bad)))
    with pytest.raises(InvalidArgument, match="one non-empty line") as failed:
        asyncio.run(eng.open())
    assert "secret" not in str(failed.value)
    missing = SessionEngine(
        EngineSettings(url="redis://127.0.0.1:1", password_file=str(tmp_path / "none"))
    )
    with pytest.raises(InvalidArgument, match="cannot read password_file"):
        asyncio.run(missing.open())
