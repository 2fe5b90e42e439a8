"""docker/: the compose file, checked statically and then brought up for real.

Static part (no Docker engine needed): the containers run the same node configuration as
the local harness (``engine.cluster.NODE_CONF``) and override nothing but what is per node.

Live part (marker ``docker``): ``scripts/docker-cluster.sh`` starts a private ``dockerd``
and builds the images the compose file names (nothing is pulled); then ``docker-compose
up``, the demo from the host against the containers' cluster, a Locust swarm through the
app container, a primary cut off with ``docker network disconnect`` and healed, an app
whose only seed does not resolve yet, and ``down -v``. Skipped where no Docker engine can
start (not root, no apt-get); ``RSE_DOCKER_REQUIRED=1`` (set by ``.ci/run``) turns that
skip into a failure. Timings are printed (``pytest -s``): see bench.md, "Docker".
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import os
import re
import shlex
import socket
import subprocess
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml
from docker_cluster import (
    NODE_ADDRESS,
    DockerCluster,
    DockerUnavailable,
    cluster_info,
    node_client,
    node_named,
    prepare,
    replication,
    wait_for,
)

from engine import EngineSettings, EngineUnavailable, SessionEngine
from engine.testing import NODE_CONF

DOCKER = Path(__file__).resolve().parent.parent / "docker"
COMPOSE = DOCKER / "docker-compose.yml"
NODES = [f"redis-node-{i}" for i in range(6)]
# The only settings a node may get on its command line: they differ from node to node.
PER_NODE_FLAGS = {
    "port",
    "cluster-port",
    "cluster-announce-ip",
    "cluster-announce-hostname",
}
# The private range the Docker tooling pins (scripts/docker-cluster.sh, README "Docker").
DOCKER_RANGE = ipaddress.ip_network("10.231.0.0/16")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    return dict(compose["services"])


def node_conf_directives() -> set[str]:
    names = set()
    for raw in NODE_CONF.read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            names.add(line.split()[0].lower())
    return names


def command_words(service: dict[str, Any]) -> list[str]:
    cmd = service["command"]
    return list(cmd) if isinstance(cmd, list) else shlex.split(cmd)


def flags(words: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for i, word in enumerate(words):
        if word.startswith("--"):
            out[word[2:]] = words[i + 1]
    return out


def mount_of_node_conf(service: dict[str, Any]) -> str:
    """The container path where the service mounts ../engine/redis-node.conf read-only."""
    for volume in service.get("volumes", []):
        source, target, *mode = volume.split(":")
        if (DOCKER / source).resolve() == NODE_CONF:
            assert mode == ["ro"], f"{volume} must be read-only"
            return str(target)
    raise AssertionError("the node does not mount ../engine/redis-node.conf")


def test_the_mounted_file_is_the_harness_node_conf() -> None:
    assert (DOCKER / "../engine/redis-node.conf").resolve() == NODE_CONF
    assert NODE_CONF.is_file()
    # Passed as the main config file (no include around it), it must stand alone and stay
    # host-neutral: nothing per node, no include of its own.
    directives = node_conf_directives()
    assert "include" not in directives
    assert not directives & {"port", "bind", "dir", "logfile", "cluster-port"}
    assert not directives & PER_NODE_FLAGS
    assert "cluster-enabled" in directives and "cluster-node-timeout" in directives


def test_six_nodes_share_the_config_and_override_only_per_node_settings(
    services: dict[str, Any],
) -> None:
    assert set(NODES) <= set(services)
    assert len([s for s in services if s.startswith("redis-node-")]) == 6
    shared = node_conf_directives()
    ports, bus_ports = [], []
    for name in NODES:
        svc = services[name]
        assert svc["image"] == "redis:7.0", name
        words = command_words(svc)
        target = mount_of_node_conf(svc)
        assert words[:2] == ["redis-server", target], name
        given = flags(words)
        assert set(given) <= PER_NODE_FLAGS, f"{name} overrides {set(given) - PER_NODE_FLAGS}"
        assert not set(given) & shared, f"{name} drifts from {NODE_CONF.name}"
        port, bus = int(given["port"]), int(given["cluster-port"])
        assert bus == port + 10000, name
        assert given["cluster-announce-hostname"] == name
        # The node announces its fixed address on the compose network: clients (in the
        # app container or on the Docker host) are redirected to an IP they can reach.
        fixed = svc["networks"]["cluster"]["ipv4_address"]
        assert given["cluster-announce-ip"] == fixed, name
        assert (fixed, port) == NODE_ADDRESS[name]
        ports.append(port)
        bus_ports.append(bus)
        assert {str(port), str(bus)} <= {str(p) for p in svc["expose"]}, name
        test = svc["healthcheck"]["test"]
        assert test[0] == "CMD" and test[1:] == ["redis-cli", "-p", str(port), "ping"], name
    assert sorted(ports) == list(range(7000, 7006))
    assert sorted(bus_ports) == list(range(17000, 17006))


def test_cluster_init(services: dict[str, Any]) -> None:
    init = services["cluster-init"]
    depends = init["depends_on"]
    assert set(depends) == set(NODES)
    assert all(depends[n]["condition"] == "service_healthy" for n in NODES)
    script = "\n".join(init["command"]) if isinstance(init["command"], list) else init["command"]
    assert "--cluster create" in script and "--cluster-replicas 1" in script
    assert "--cluster-yes" in script and "cluster_state" in script
    # Success only once the cluster is whole: every node ok, six known, replica links up.
    assert "master_link_status" in script and "cluster_known_nodes" in script
    # Compose interpolates a single "$" from the host environment: the script must use "$$".
    assert not re.search(r"(?<!\$)\$(?!\$)", script), "unescaped $ in cluster-init"
    assert init.get("restart") == "no"


def test_the_network_is_in_the_documented_range(compose: dict[str, Any]) -> None:
    (config,) = compose["networks"]["cluster"]["ipam"]["config"]
    subnet = ipaddress.ip_network(config["subnet"])
    assert subnet.subnet_of(DOCKER_RANGE)  # type: ignore[arg-type]
    dynamic = ipaddress.ip_network(config["ip_range"])
    assert dynamic.subnet_of(subnet)  # type: ignore[arg-type]
    for ip, _ in NODE_ADDRESS.values():
        # Fixed node addresses lie outside the range handed out to other containers.
        assert ipaddress.ip_address(ip) in subnet and ipaddress.ip_address(ip) not in dynamic


def test_app_locust_and_dockerfile(services: dict[str, Any]) -> None:
    app = services["app"]
    assert app["depends_on"]["cluster-init"]["condition"] == "service_completed_successfully"
    assert "/healthz" in " ".join(app["healthcheck"]["test"])
    # uvicorn with workers exits 0 when a worker's start-up fails: restart on any exit.
    assert app["restart"] == "unless-stopped"
    assert float(app["environment"]["APP_STARTUP_RETRY"]) > 0
    seeds = app["environment"]["ENGINE_URL"].split(",")
    assert len(seeds) == 6
    for url in seeds:
        match = re.fullmatch(r"redis://([\w-]+):(\d+)", url)
        assert match, url
        host, port = match.groups()
        assert host in NODES and flags(command_words(services[host]))["port"] == port
    assert (DOCKER / app["build"]["context"]).resolve() == DOCKER.parent
    dockerfile = (DOCKER / ".." / app["build"]["dockerfile"]).resolve()
    text = dockerfile.read_text()
    assert re.search(r"^FROM python:3\.11-slim$", text, re.M)
    assert '.[fastapi]"' in text and "loadtest.app:app" in text

    master, worker = services["locust-master"], services["locust-worker"]
    for svc in (master, worker):
        mounted = [v.split(":")[0] for v in svc["volumes"]]
        assert "../loadtest/locustfile.py" in mounted
        assert (DOCKER / "../loadtest/locustfile.py").is_file()
    assert "--master" in command_words(master) and "http://app:8000" in command_words(master)
    # Locust's option is --expect-workers; an unknown option makes the master exit at once.
    assert flags(command_words(master))["expect-workers"] == "2"
    assert "--expected-workers" not in command_words(master)
    assert flags(command_words(worker))["master-host"] == "locust-master"
    assert worker["deploy"]["replicas"] == 2
    assert master["depends_on"]["app"]["condition"] == "service_healthy"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_node_command_line_runs_with_the_shared_file(
    services: dict[str, Any], tmp_path: Path
) -> None:
    """The node command as compose runs it (paths and ports mapped to this host) starts."""
    words = command_words(services["redis-node-0"])
    port = _free_port()
    bus = port + 10000 if port + 10000 < 65536 else _free_port()
    given = flags(words)
    cmd = ["redis-server", str(NODE_CONF)]
    for flag, value in given.items():
        cmd += [f"--{flag}", {"port": str(port), "cluster-port": str(bus)}.get(flag, value)]
    cmd += ["--bind", "127.0.0.1", "--logfile", str(tmp_path / "log")]
    proc = subprocess.Popen(cmd, cwd=tmp_path)
    try:
        client = redis.Redis(port=port, socket_timeout=1, decode_responses=True)
        deadline = time.monotonic() + 10
        while True:
            try:
                assert client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    log = (tmp_path / "log").read_text() if (tmp_path / "log").exists() else ""
                    raise AssertionError(f"node did not start: {log[-800:]}") from None
                time.sleep(0.05)
        cfg = client.config_get("cluster-*")
        conf = dict(
            line.split(None, 1)
            for line in NODE_CONF.read_text().splitlines()
            if line.strip() and not line.startswith("#")
        )
        assert cfg["cluster-enabled"] == "yes"
        assert cfg["cluster-node-timeout"] == conf["cluster-node-timeout"].strip()
        assert cfg["cluster-announce-hostname"] == "redis-node-0"
        assert client.config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"
        client.close()
    finally:
        proc.terminate()
        proc.wait(10)


# -- the app's start-up retry, which the compose file relies on (no Docker needed) -------


async def test_the_app_retries_its_seeds_then_fails_its_start_up(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from loadtest.app import create_app

    monkeypatch.setenv("APP_STARTUP_RETRY", "1.5")
    app = create_app(EngineSettings(url="redis://no-such-node.invalid:7000"))
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="loadtest.app"), pytest.raises(EngineUnavailable):
        async with app.router.lifespan_context(app):
            pass
    assert time.monotonic() - t0 >= 1.5
    retries = [r.getMessage() for r in caplog.records if r.name == "loadtest.app"]
    assert len(retries) >= 2
    assert all("no-such-node.invalid:7000" in line for line in retries)
    assert "retrying in 1 s" in retries[0] and "giving up" in retries[-1]


async def test_a_bad_startup_retry_value_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from loadtest.app import create_app

    for bad in ("soon", "-1", "nan"):
        monkeypatch.setenv("APP_STARTUP_RETRY", bad)
        app = create_app(EngineSettings(url="redis://no-such-node.invalid:7000"))
        with pytest.raises(ValueError, match="APP_STARTUP_RETRY"):
            async with app.router.lifespan_context(app):
                pass


# -- the cluster brought up for real (marker `docker`) ---------------------------------

PROJECT = "rse-ci"
SEEDS = ",".join(f"redis://{ip}:{port}" for ip, port in NODE_ADDRESS.values())


def _timing(what: str, seconds: float) -> None:
    # Read by the bench.md "Docker" table (pytest -s shows it).
    print(f"\ndocker timing: {what}: {seconds:.1f} s")


@pytest.fixture(scope="module")
def docker_cluster() -> Iterator[DockerCluster]:
    # The first test to use it pays for the set-up (cold: apt-get, debootstrap, image
    # builds, a few minutes): hence the docker tests' 900 s timeout.
    try:
        t0 = time.monotonic()
        cluster = prepare(PROJECT)
    except DockerUnavailable as exc:
        if os.environ.get("RSE_DOCKER_REQUIRED") == "1":
            pytest.fail(f"no Docker engine, and RSE_DOCKER_REQUIRED=1: {exc}")
        pytest.skip(f"no Docker engine on this machine: {exc}")
    _timing("daemon + images (cached unless this is the first run)", time.monotonic() - t0)
    try:
        cluster.compose("down", "-v", "--remove-orphans")  # what a killed run left behind
        t0 = time.monotonic()
        cluster.compose("build", "-q", "app", timeout=600)
        _timing("app image build", time.monotonic() - t0)
        t0 = time.monotonic()
        # Returns once every dependency condition held: nodes healthy, cluster-init done,
        # app healthy (locust-master waits for it).
        cluster.compose("up", "-d", timeout=300)
        _timing("compose up to healthy", time.monotonic() - t0)
        # No waiting: cluster-init has exited 0, so the cluster must already be whole.
        cluster.links_up_at_start = cluster.replica_links_up()
        cluster.states_at_start = [cluster_info(n)["cluster_state"] for n in NODES]
        yield cluster
    finally:
        cluster.compose("down", "-v", "--remove-orphans", check=False)
        if cluster.started_daemon:
            cluster.script("daemon-stop")
        cluster.release()


@pytest.mark.docker
@pytest.mark.timeout(900)
def test_compose_up_reports_success_only_with_every_replica_link_up(
    docker_cluster: DockerCluster,
) -> None:
    c = docker_cluster
    # Read when `up -d` returned, right after cluster-init had reported success.
    assert c.links_up_at_start == 3
    assert c.states_at_start == ["ok"] * 6
    assert all(int(cluster_info(n)["cluster_known_nodes"]) == 6 for n in NODES)
    init = c.container("cluster-init")
    assert c.docker("inspect", "--format", "{{.State.ExitCode}}", init).strip() == "0"
    assert "3 replica links up" in c.logs("cluster-init")
    status = "{{.State.Health.Status}}"
    assert c.docker("inspect", "--format", status, c.container("app")).strip() == "healthy"
    # The Locust master is still running (an unknown option made it exit at once).
    running = "{{.State.Running}}"
    assert c.docker("inspect", "--format", running, c.container("locust-master")).strip() == (
        "true"
    )


@pytest.mark.docker
@pytest.mark.timeout(900)
def test_cluster_init_fails_while_a_replica_link_is_down(docker_cluster: DockerCluster) -> None:
    c = docker_cluster
    replica = sorted(set(NODES) - set(c.primaries()))[0]
    # A wrong masterauth keeps this replica's link down while every node answers.
    with node_client(replica) as client:
        client.config_set("masterauth", "wrong-on-purpose")
        client.client_kill_filter(_type="master")
        try:
            wait_for("the link to go down", lambda: c.replica_links_up() == 2, 10)
            run = ("run", "--rm", "--no-deps", "-e", "CLUSTER_INIT_WAIT=3", "cluster-init")
            proc = c.compose_process(*run, timeout=60)
            assert proc.returncode == 1, proc.stdout + proc.stderr
            assert "3 replica links up" not in proc.stdout
            assert "the cluster is not whole after 3 s" in proc.stderr
        finally:
            client.config_set("masterauth", "")
    wait_for("the link back up", lambda: c.replica_links_up() == 3, 30)
    # Whole again: cluster-init (which does not create twice) succeeds.
    proc = c.compose_process("run", "--rm", "--no-deps", "cluster-init", timeout=60)
    assert proc.returncode == 0 and "3 replica links up" in proc.stdout, proc.stderr


@pytest.mark.docker
@pytest.mark.timeout(900)
def test_demo_from_the_host_against_the_containers(docker_cluster: DockerCluster) -> None:
    ip, port = NODE_ADDRESS["redis-node-0"]
    cmd = [
        *(str(DOCKER.parent / ".venv/bin/python"), "-m", "engine", "demo"),
        *("--url", f"redis://{ip}:{port}", "--sessions", "5000", "--users", "500"),
        *("--seconds", "2", "--prefix", f"dockerdemo{uuid.uuid4().hex[:6]}"),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "engine open: cluster, 3 primaries" in proc.stdout
    assert "old tokens dead: 500" in proc.stdout + proc.stderr  # progress is on stderr


def _locust(base: str, path: str, form: dict[str, str] | None = None) -> dict[str, Any]:
    data = urllib.parse.urlencode(form).encode() if form is not None else None
    with urllib.request.urlopen(f"{base}{path}", data=data, timeout=10) as reply:
        result = json.load(reply)
    assert isinstance(result, dict)
    return result


@pytest.mark.docker
@pytest.mark.timeout(900)
def test_locust_swarm_through_the_app_container(docker_cluster: DockerCluster) -> None:
    c = docker_cluster
    base = f"http://{c.address(c.container('locust-master'))}:8089"
    wait_for("2 Locust workers", lambda: _locust(base, "/stats/requests")["worker_count"] == 2, 60)
    # 20 users for 15 s (the compose file's master and workers, started over the web API).
    form = {"user_count": "20", "spawn_rate": "10", "host": "http://app:8000", "run_time": "15s"}
    assert _locust(base, "/swarm", form)["success"]
    wait_for(
        "the swarm to end",
        lambda: _locust(base, "/stats/requests")["state"] == "stopped",
        90,
        step=1,
    )
    stats = _locust(base, "/stats/requests")
    total = next(s for s in stats["stats"] if s["name"] == "Aggregated")
    _timing(f"locust swarm: {total['num_requests']} requests in 15 s", 15)
    assert total["num_requests"] >= 100, total
    assert total["num_failures"] == 0, stats["errors"]


@pytest.mark.docker
@pytest.mark.timeout(900)
async def test_a_partitioned_primary_is_replaced_then_rejoins(
    docker_cluster: DockerCluster,
) -> None:
    c = docker_cluster
    victim, replica = sorted(c.primaries().items())[0]
    container = c.container(victim)
    settings = EngineSettings(url=SEEDS, key_prefix=f"part{uuid.uuid4().hex[:6]}", wait_replicas=1)
    async with SessionEngine(settings) as eng:
        # Acknowledged with wait_replicas=1: each is on its shard's replica.
        tokens = [(await eng.create(user_id=f"user-{i}")).token for i in range(300)]
        failed: list[tuple[float, float]] = []  # (start, end) of rounds with an error
        stop = asyncio.Event()

        async def probe() -> None:
            while not stop.is_set():
                start = time.monotonic()
                found = await asyncio.gather(
                    *map(eng.validate, tokens[:60]), return_exceptions=True
                )
                if any(isinstance(f, EngineUnavailable) for f in found):
                    failed.append((start, time.monotonic()))
                else:
                    assert all(f is not None for f in found), found
                await asyncio.sleep(0.05)

        probing = asyncio.create_task(probe())
        await asyncio.sleep(0.5)
        t0 = time.monotonic()
        # In a thread: the probe keeps running while docker works.
        await asyncio.to_thread(c.docker, "network", "disconnect", c.network, container)
        await asyncio.to_thread(
            wait_for, f"{replica} promoted", lambda: replication(replica)["role"] == "master", 30
        )
        # From the start of `docker network disconnect` (the command itself takes ~0.3 s).
        _timing(f"promotion of {replica} after disconnecting {victim}", time.monotonic() - t0)
        others = [n for n in NODES if n != victim]
        await asyncio.to_thread(
            wait_for,
            "cluster_state:ok on the five others",
            lambda: all(cluster_info(n)["cluster_state"] == "ok" for n in others),
            30,
        )
        # The engine follows the new primary: validations succeed again without a restart.
        await asyncio.to_thread(
            wait_for,
            "validations succeed again",
            lambda: bool(failed) and time.monotonic() - failed[-1][1] > 2,
            30,
        )
        stop.set()
        await probing
        # Until the last failing validation returned, from the start of the disconnect.
        _timing("engine validation errors on that shard, until", failed[-1][1] - t0)
        assert failed[0][0] >= t0 - 0.5  # no error before the cut (a round lasts < 0.5 s)
        assert all(s is not None for s in await eng.validate_many(tokens))

        ip, _ = NODE_ADDRESS[victim]
        t0 = time.monotonic()
        await asyncio.to_thread(
            c.docker, "network", "connect", "--ip", ip, "--alias", victim, c.network, container
        )

        def rejoined() -> bool:
            info = replication(victim)
            return (
                info["role"] == "slave"
                and info.get("master_link_status") == "up"
                and node_named(info["master_host"]) == replica
                and c.whole()
            )

        await asyncio.to_thread(wait_for, f"{victim} rejoins as a replica", rejoined, 60)
        _timing(
            f"heal: {victim} a replica of {replica} with its link up, from `network connect`",
            time.monotonic() - t0,
        )
        # Nothing acknowledged with wait_replicas=1 was lost.
        assert all(s is not None for s in await eng.validate_many(tokens))


@pytest.mark.docker
@pytest.mark.timeout(900)
def test_the_app_waits_for_a_seed_that_does_not_resolve_yet(
    docker_cluster: DockerCluster,
) -> None:
    c = docker_cluster
    # A replica: stopping it moves no slots. A stopped container's name does not resolve.
    node = sorted(set(NODES) - set(c.primaries()))[0]
    container = c.container(node)
    _, port = NODE_ADDRESS[node]
    name = f"{PROJECT}-late-app"
    c.docker("stop", "-t", "2", container)
    try:
        c.compose(
            *("run", "-d", "--no-deps", "--name", name, "-e", f"ENGINE_URL=redis://{node}:{port}"),
            *("-e", "APP_STARTUP_RETRY=60", "-e", "WEB_CONCURRENCY=1", "app"),
        )
        wait_for(
            "the app's retry log line",
            lambda: "start-up: cannot reach the cluster yet" in c.container_logs(name),
            30,
            step=0.5,
        )
        # Name resolution fails (or times out: this daemon's containers have no route to
        # the host's DNS servers, where Docker forwards names it does not know).
        assert f"cannot connect to {node}:{port}" in c.container_logs(name)
        c.docker("start", container)
        url = f"http://{c.address(name)}:8000/healthz"

        def healthy() -> bool:
            with urllib.request.urlopen(url, timeout=2) as reply:
                return bool(reply.status == 200)

        wait_for("the late app to answer /healthz", healthy, 60, step=0.5)
    finally:
        c.docker("rm", "-f", name, check=False)
        c.docker("start", container, check=False)
    wait_for("the cluster whole again", c.whole, 60)
