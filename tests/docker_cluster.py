"""The Docker cluster of ``docker/docker-compose.yml``, driven from tests.

``scripts/docker-cluster.sh`` installs Docker, starts a private ``dockerd`` and builds the
images; this module runs ``docker-compose`` and ``docker`` against that daemon and talks
to the nodes at their fixed addresses (``10.231.13.1i``), which the host reaches over the
bridge. Only addresses of that compose network are ever contacted.
"""

from __future__ import annotations

import fcntl
import os
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "docker-cluster.sh"
COMPOSE_FILE = ROOT / "docker" / "docker-compose.yml"
SOCKET = "/run/rse-docker.sock"
# One run at a time on a machine: they share the daemon, its socket and the project name.
LOCK = "/run/rse-docker.test.lock"
LOCK_WAIT = 900.0
NODES = [f"redis-node-{i}" for i in range(6)]
NODE_ADDRESS = {name: (f"10.231.13.1{i}", 7000 + i) for i, name in enumerate(NODES)}
# The script's exit codes for "this machine cannot run a Docker engine here".
NO_ENGINE_CODES = {3: "cannot install Docker", 4: "dockerd does not start"}


class DockerUnavailable(Exception):
    """No Docker engine can run on this machine (the reason is the message)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(what: str, check: Callable[[], bool], timeout: float, step: float = 0.1) -> float:
    """Seconds until ``check()`` is true; AssertionError naming ``what`` after ``timeout``."""
    t0 = time.monotonic()
    while True:
        try:
            if check():
                return time.monotonic() - t0
        except (redis.RedisError, OSError):
            pass  # a node that does not answer yet is a "not yet"
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"{what}: not within {timeout:.0f} s")
        time.sleep(step)


def node_client(name: str) -> redis.Redis:
    host, port = NODE_ADDRESS[name]
    return redis.Redis(
        host=host, port=port, socket_timeout=1, socket_connect_timeout=1, decode_responses=True
    )


def replication(name: str) -> dict[str, Any]:
    with node_client(name) as client:
        return dict(client.info("replication"))


def cluster_info(name: str) -> dict[str, Any]:
    with node_client(name) as client:
        return dict(client.cluster("INFO"))


def node_named(host: str) -> str:
    """The service name of the node at ``host`` (one of the fixed addresses)."""
    for name, (ip, _) in NODE_ADDRESS.items():
        if ip == host:
            return name
    raise AssertionError(f"{host} is not one of the compose file's node addresses")


@dataclass
class DockerCluster:
    """One compose project on the private daemon. Every call is bounded in time."""

    project: str
    env: dict[str, str] = field(default_factory=dict)
    started_daemon: bool = False
    lock_fd: int = -1
    # Read the moment `docker-compose up -d` returned (tests may run in any order).
    links_up_at_start: int = -1
    states_at_start: list[str] = field(default_factory=list)

    def release(self) -> None:
        """Let the next run on this machine have the daemon."""
        if self.lock_fd >= 0:
            os.close(self.lock_fd)  # closing drops the flock
            self.lock_fd = -1

    @property
    def network(self) -> str:
        return f"{self.project}_cluster"

    def run(self, *cmd: str, timeout: float = 120, check: bool = True) -> str:
        proc = subprocess.run(
            cmd, env=self.env, capture_output=True, text=True, timeout=timeout, check=False
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"{' '.join(cmd)} exited {proc.returncode}:\n"
                f"{proc.stdout[-1500:]}\n{proc.stderr[-1500:]}"
            )
        return proc.stdout

    def script(self, *args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", str(SCRIPT), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def compose(self, *args: str, timeout: float = 300, check: bool = True) -> str:
        return self.run(
            "docker-compose",
            "-p",
            self.project,
            "-f",
            str(COMPOSE_FILE),
            *args,
            timeout=timeout,
            check=check,
        )

    def compose_process(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        cmd = ["docker-compose", "-p", self.project, "-f", str(COMPOSE_FILE), *args]
        return subprocess.run(
            cmd, env=self.env, capture_output=True, text=True, timeout=timeout, check=False
        )

    def docker(self, *args: str, timeout: float = 60, check: bool = True) -> str:
        return self.run("docker", *args, timeout=timeout, check=check)

    def container(self, service: str) -> str:
        ids = self.compose("ps", "-q", service).split()
        assert len(ids) == 1, f"{service}: containers {ids}"
        return ids[0]

    def address(self, container: str) -> str:
        fmt = "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}"
        return self.docker("inspect", "--format", fmt, container).strip()

    def container_logs(self, container: str) -> str:
        """Its stdout and stderr (uvicorn logs to stderr)."""
        proc = subprocess.run(
            ["docker", "logs", container],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        return proc.stdout + proc.stderr

    def logs(self, service: str) -> str:
        return self.compose("logs", "--no-color", "--tail", "200", service, check=False)

    # -- the cluster, as the nodes see it ------------------------------------------------

    def replica_links_up(self, nodes: list[str] = NODES) -> int:
        """How many of ``nodes`` are replicas with their replication link up."""
        up = 0
        for name in nodes:
            info = replication(name)
            if info["role"] == "slave" and info.get("master_link_status") == "up":
                up += 1
        return up

    def whole(self, nodes: list[str] = NODES) -> bool:
        """Every node in ``nodes`` says cluster_state:ok and 3 replicas have their link up."""
        return all(cluster_info(n)["cluster_state"] == "ok" for n in nodes) and (
            self.replica_links_up(nodes) == 3
        )

    def primaries(self) -> dict[str, str]:
        """Primary -> its replica, by service name, from the primaries' INFO replication."""
        out = {}
        for name in NODES:
            info = replication(name)
            if info["role"] == "master" and info.get("connected_slaves", 0) >= 1:
                out[name] = node_named(info["slave0"]["ip"])
        return out


def take_lock() -> int:
    """An exclusive flock on ``LOCK`` (waits up to ``LOCK_WAIT`` s for another run)."""
    fd = os.open(LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    give_up = time.monotonic() + LOCK_WAIT
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() > give_up:
                os.close(fd)
                raise AssertionError(f"another docker test run holds {LOCK}") from None
            time.sleep(1)


def daemon_answers(env: dict[str, str]) -> bool:
    try:
        proc = subprocess.run(
            ["docker", "version"], env=env, capture_output=True, timeout=20, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return proc.returncode == 0


def prepare(project: str) -> DockerCluster:
    """A private daemon running (started if needed) and the images built or cached.

    Raises:
        DockerUnavailable: not root, not Linux, or dockerd cannot be installed or started.
    """
    if os.uname().sysname != "Linux" or os.geteuid() != 0:
        raise DockerUnavailable("the private dockerd needs root on Linux")
    env = dict(os.environ)
    env |= {
        "DOCKER_HOST": f"unix://{SOCKET}",
        "RSE_COMPOSE_PROJECT": project,
        # Host ports of the compose file, free here (the test reaches containers directly).
        "APP_PORT": str(free_port()),
        "LOCUST_WEB_PORT": str(free_port()),
        # Locust users that think 0.2-1 s: a 15 s swarm of 20 makes ~1,200 requests.
        "LOCUST_WAIT_MIN": "0.2",
        "LOCUST_WAIT_MAX": "1",
    }
    cluster = DockerCluster(project, env, lock_fd=take_lock())
    try:
        # Stop the daemon at the end only if this run started it.
        cluster.started_daemon = not daemon_answers(env)
        proc = cluster.script("daemon-start")
        if proc.returncode in NO_ENGINE_CODES:
            reason = NO_ENGINE_CODES[proc.returncode]
            raise DockerUnavailable(f"{reason}: {proc.stderr[-600:]}")
        assert proc.returncode == 0, proc.stderr[-1500:]
        proc = cluster.script("images")
        assert proc.returncode == 0, proc.stderr[-1500:]
    except BaseException:
        cluster.release()
        raise
    return cluster
