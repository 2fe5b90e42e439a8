"""A cluster that speaks only TLS (``LocalCluster(tls=True)``): every link is TLS, and the
engine routes, follows redirects, refreshes its slot map and rides a failover over it.

One TLS cluster for the module; the failover test runs last and leaves roles changed.
"""

from __future__ import annotations

import asyncio
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import redis

from engine import EngineSettings, EngineUnavailable, SessionEngine
from engine._keys import slot_of_tag
from engine._tokens import parse_token
from engine.testing import LocalCluster, delete_prefix, keys_under

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def cl() -> Iterator[LocalCluster]:
    with LocalCluster(primaries=3, replicas_per_primary=1, tls=True) as cluster:
        yield cluster


def slot_of_token(token: str) -> int:
    parsed = parse_token(token)
    assert parsed is not None
    return slot_of_tag(parsed[0])


@asynccontextmanager
async def tls_engine(cl: LocalCluster, **fields: Any) -> AsyncIterator[SessionEngine]:
    settings = EngineSettings(url=cl.url, tls_ca_file=str(cl.ca_file), key_prefix="tlscl", **fields)
    async with SessionEngine(settings) as eng:
        yield eng


def test_every_node_speaks_only_tls(cl: LocalCluster) -> None:
    assert cl.url.startswith("rediss://")
    assert cl.ca_file is not None and Path(cl.ca_file).is_file()
    for node in cl.nodes:
        assert node.url.startswith("rediss://")
        conf: dict[str, str] = {}
        for name in ("port", "tls-port", "tls-cluster", "tls-replication"):
            conf.update(cl.run(node.port, "CONFIG", "GET", name))
        assert conf["port"] == "0"  # no plaintext port at all
        assert conf["tls-port"] == str(node.port)
        assert conf["tls-cluster"] == conf["tls-replication"] == "yes"
    # A plaintext client gets nowhere: the port only answers a TLS handshake.
    plain = redis.Redis(host=cl.host, port=cl.ports[0], socket_timeout=1, socket_connect_timeout=1)
    with pytest.raises(redis.ConnectionError):
        plain.ping()
    plain.close()


def test_cluster_slots_reports_the_tls_ports(cl: LocalCluster) -> None:
    reply = cl.run(cl.ports[0], "CLUSTER", "SLOTS")
    ports = {entry[2][1] for entry in reply}
    assert ports == {n.port for n in cl.primaries()}


async def test_engine_contract_over_tls(cl: LocalCluster) -> None:
    async with tls_engine(cl) as eng:
        assert eng.is_cluster
        # The slot map came from CLUSTER SLOTS over TLS: the nodes are the TLS ports.
        assert {n.port for n in eng.transport.primaries()} == {n.port for n in cl.primaries()}
        new = await eng.create(user_id="tls-user")
        assert (await eng.validate(new.token)) is not None
        rotated = await eng.rotate(new.token)
        assert await eng.validate(new.token) is None
        assert await eng.validate_many([rotated.token] * 50) != [None] * 50
        await eng.chat_append("tls-user", "room", {"text": "hello"})
        assert len(await eng.chat_history("tls-user", "room")) == 1
        assert await eng.revoke_user("tls-user") >= 1
        await eng.create(user_id="left-behind")
    # The harness's key helpers speak TLS too.
    assert keys_under(cl.url, "tlscl", ca_file=cl.ca_file)
    assert delete_prefix(cl.url, "tlscl", ca_file=cl.ca_file) > 0
    assert keys_under(cl.url, "tlscl", ca_file=cl.ca_file) == []


async def test_moved_is_followed_over_tls(cl: LocalCluster) -> None:
    async with tls_engine(cl) as eng:
        token = (await eng.create(user_id="moved")).token
        t = eng.transport
        slot = slot_of_token(token)
        right = t.node_for_slot(slot)
        t._slot_nodes[slot] = next(n for n in t.primaries() if n is not right)
        moved = t.redirects["MOVED"]
        assert await eng.validate(token) is not None
        assert t.redirects["MOVED"] == moved + 1
        # The MOVED reply named the TLS port, which the engine reached over TLS.
        assert t.node_for_slot(slot) is right


async def test_untrusted_ca_fails_closed(cl: LocalCluster) -> None:
    eng = SessionEngine(EngineSettings(url=cl.url, key_prefix="tlscl", connect_timeout=0.5))
    with pytest.raises(EngineUnavailable, match=r"CERTIFICATE_VERIFY_FAILED|certificate"):
        await eng.open()
    await eng.aclose()


async def test_failover_and_slot_refresh_over_tls(cl: LocalCluster) -> None:
    async with tls_engine(cl, command_timeout=2.0) as eng:
        token = (await eng.create(user_id="failover")).token
        slot = slot_of_token(token)
        old = eng.transport.node_for_slot(slot)
        replica = next(
            r
            for r in cl.replicas()
            if r.master_id == next(p.node_id for p in cl.primaries() if p.port == old.port)
        )
        await asyncio.to_thread(cl.failover, replica.port)
        # The old primary answers MOVED (now a replica); the refresh over TLS finds the new.
        assert await eng.validate(token) is not None
        assert eng.transport.node_for_slot(slot).port == replica.port
        await asyncio.to_thread(cl.wait_healthy, 30.0)


def test_tls_context_is_a_real_verifying_context(cl: LocalCluster) -> None:
    eng = SessionEngine(EngineSettings(url=cl.url, tls_ca_file=str(cl.ca_file)))
    context = eng._ssl_context()
    assert context is not None
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname


def test_cli_up_tls_status_down(tmp_path: Path) -> None:
    state_file = tmp_path / "state.json"

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "engine", "cluster", *args, "--state-file", str(state_file)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    up = cli("up", "--tls", "--primaries", "1", "--replicas", "1")
    try:
        assert up.returncode == 0, up.stderr
        url, ca_line = up.stdout.splitlines()[:2]
        assert url.startswith("rediss://")
        ca_file = ca_line.split("CA to trust: ", 1)[1].split(" ")[0]
        assert Path(ca_file).is_file()
        # status re-attaches from the state file and speaks TLS to the nodes.
        status = cli("status")
        assert status.returncode == 0, status.stdout + status.stderr
        assert "cluster_state: ok" in status.stdout
        attached = LocalCluster.from_state_file(state_file)
        assert attached.url == url and str(attached.ca_file) == ca_file

        async def use() -> None:
            settings = EngineSettings(url=url, tls_ca_file=ca_file, key_prefix="tlscli")
            async with SessionEngine(settings) as eng:
                assert await eng.validate((await eng.create(user_id="cli")).token) is not None

        asyncio.run(use())
        assert cli("down").returncode == 0
    finally:
        if state_file.exists():  # a failed assertion must not leak servers
            LocalCluster.from_state_file(state_file).stop()
