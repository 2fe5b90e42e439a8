"""The engine authenticates with AUTH from the URL or the settings (a plain server with
``requirepass``, started and stopped here by pid)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from helpers import plain_redis_server
from pydantic import SecretStr

from engine import EngineSettings, EngineUnavailable, SessionEngine


@pytest.fixture(scope="module")
def protected_port() -> Iterator[int]:
    with plain_redis_server("--requirepass", "s3cret") as port:
        yield port


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
