"""docker/: the compose file is checked statically (no Docker engine needed here).

The point is that the containers run the same node configuration as the local harness
(``engine.cluster.NODE_CONF``) and override nothing but what is per node.
"""

from __future__ import annotations

import re
import shlex
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml

from engine.testing import NODE_CONF

DOCKER = Path(__file__).resolve().parent.parent / "docker"
COMPOSE = DOCKER / "docker-compose.yml"
NODES = [f"redis-node-{i}" for i in range(6)]
# The only settings a node may get on its command line: they differ from node to node.
PER_NODE_FLAGS = {
    "port",
    "cluster-port",
    "cluster-announce-hostname",
    "cluster-preferred-endpoint-type",
}


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
    # Compose interpolates a single "$" from the host environment: the script must use "$$".
    assert not re.search(r"(?<!\$)\$(?!\$)", script), "unescaped $ in cluster-init"
    assert init.get("restart") == "no"


def test_app_locust_and_dockerfile(services: dict[str, Any]) -> None:
    app = services["app"]
    assert app["depends_on"]["cluster-init"]["condition"] == "service_completed_successfully"
    assert "/healthz" in " ".join(app["healthcheck"]["test"])
    url = app["environment"]["ENGINE_URL"]
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
