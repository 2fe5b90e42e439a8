"""The engine authenticates with AUTH from the URL or the settings (a plain server with
``requirepass``, started and stopped here by pid)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator

import pytest
from pydantic import SecretStr

from engine import EngineSettings, EngineUnavailable, SessionEngine


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def protected_port() -> Iterator[int]:
    exe = shutil.which("redis-server")
    assert exe, "redis-server is missing: apt-get install redis-server"
    port = _free_port()
    proc = subprocess.Popen(
        [
            exe,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--requirepass",
            "s3cret",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.05)
        yield port
    finally:
        proc.kill()
        proc.wait(10)


async def test_password_in_the_url(protected_port: int) -> None:
    url = f"redis://:s3cret@127.0.0.1:{protected_port}"
    async with SessionEngine.from_url(url, key_prefix="auth") as eng:
        new = await eng.create(user_id="a")
        assert await eng.validate(new.token) is not None


async def test_password_in_the_settings_is_secret(protected_port: int) -> None:
    settings = EngineSettings(
        url=f"redis://127.0.0.1:{protected_port}", password=SecretStr("s3cret"), key_prefix="auth"
    )
    assert "s3cret" not in repr(settings)
    async with SessionEngine(settings) as eng:
        assert await eng.ping() == 1


async def test_wrong_password_fails_closed_at_open(protected_port: int) -> None:
    eng = SessionEngine.from_url(f"redis://:wrong@127.0.0.1:{protected_port}", key_prefix="auth")
    with pytest.raises(EngineUnavailable, match="handshake"):
        await eng.open()
