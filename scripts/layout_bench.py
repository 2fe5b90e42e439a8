"""Server-side cost of the session layouts we considered, in ONE run on one server.

    .venv/bin/python scripts/layout_bench.py

Stores one session as a hash (7 fields) and as one string value, then runs
`redis-benchmark -P 16` with EVALSHA of the minimal read each validation needs, for each
layout, twice in alternation (A B A B) so drift on a shared machine shows. Prints the
rates and the ratio string/hash. Starts and stops its own plain redis-server.
"""

from __future__ import annotations

import re
import shutil
import subprocess

from engine.testing import LocalCluster

READS = {
    "hash: HMGET 7 fields + PTTL": (
        "local f = redis.call('HMGET', KEYS[1], 'u','st','d','c','a','i','v') "
        "return {f[1], redis.call('PTTL', KEYS[1])}",
        "s:hash",
    ),
    "string: GET + PTTL": (
        "local v = redis.call('GET', KEYS[1]) return {v, redis.call('PTTL', KEYS[1])}",
        "s:string",
    ),
    "string: GET + TIME + PTTL": (
        "local v = redis.call('GET', KEYS[1]) local t = redis.call('TIME') "
        "return {v, redis.call('PTTL', KEYS[1])}",
        "s:string",
    ),
}


def rate(port: int, sha: str, key: str) -> float:
    exe = shutil.which("redis-benchmark")
    assert exe, "redis-benchmark is missing: apt-get install redis-tools"
    out = subprocess.run(
        [
            exe,
            "-p",
            str(port),
            "-n",
            "200000",
            "-c",
            "16",
            "-P",
            "16",
            "--csv",
            "EVALSHA",
            sha,
            "1",
            key,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    match = re.search(r'"[^"]*","([0-9.]+)"', out)
    assert match, out
    return float(match.group(1))


def main() -> None:
    with LocalCluster(cluster_mode=False) as server:
        port = server.ports[0]
        value = "a" + "1" * 48 + "user-1|" + '{"role":"admin"}'
        server.run(
            port,
            "HSET",
            "s:hash",
            "u",
            "user-1",
            "st",
            "a",
            "d",
            '{"role":"admin"}',
            "c",
            "1764000000000",
            "a",
            "1764086400000",
            "i",
            "1800000",
            "v",
            "1",
        )
        server.run(port, "PEXPIRE", "s:hash", 3_600_000)
        server.run(port, "SET", "s:string", value, "PX", 3_600_000)
        shas = {name: server.run(port, "SCRIPT", "LOAD", src) for name, (src, _) in READS.items()}
        results: dict[str, list[float]] = {name: [] for name in READS}
        for _ in range(2):  # alternate, so machine drift hits every layout alike
            for name, (_, key) in READS.items():
                results[name].append(rate(port, str(shas[name]), key))
        base = sum(results["hash: HMGET 7 fields + PTTL"]) / 2
        for name, rates in results.items():
            mean = sum(rates) / len(rates)
            shown = " / ".join(f"{r:,.0f}" for r in rates)
            print(f"| {name} | {shown} | {mean / base:.2f}x |")


if __name__ == "__main__":
    main()
