"""The pytest plugin, as a user meets it: a five-line test file in a project of its own."""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]

USER_TEST = """
async def test_login(session_engine):
    new = await session_engine.create(user_id="alice")
    session = await session_engine.validate(new.token)
    assert session is not None and session.user_id == "alice"
"""


def test_a_users_test_gets_a_cluster_and_an_engine_and_leaves_no_key(
    pytester: pytest.Pytester, cluster_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from engine.testing import keys_under

    before = len(keys_under(cluster_url, "t*"))
    monkeypatch.setenv("ENGINE_TEST_REDIS_URL", cluster_url)  # reuse ours: no second cluster
    pytester.makepyfile(test_user=USER_TEST)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-o", "asyncio_mode=auto")
    result.assert_outcomes(passed=1)
    assert len(keys_under(cluster_url, "t*")) == before


def test_without_redis_server_the_fixtures_skip_with_the_reason(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ENGINE_TEST_REDIS_URL", raising=False)
    monkeypatch.delenv("ENGINE_REDIS_SERVER", raising=False)  # CI's Redis 8 run sets it
    monkeypatch.setenv("PATH", "/nonexistent")
    pytester.makepyfile(
        test_user=USER_TEST
        + """

import pytest

@pytest.mark.requires_redis_server
def test_marked():
    raise AssertionError("must be skipped")
"""
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rs")
    result.assert_outcomes(skipped=2)
    result.stdout.fnmatch_lines(["*no redis-server installed*", "*redis-server is not installed*"])
