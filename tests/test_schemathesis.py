"""Property-based test of the reference service against its own OpenAPI schema.

Schemathesis generates requests for every operation the service publishes (valid ones and
ones that break the schema: wrong types, huge or odd strings, lone surrogates, missing
fields), a quarter of them with every string rewritten in 2- to 4-byte characters (the
service's limits count characters, the engine's count bytes), with or without a live
session's Bearer token.
With a healthy cluster no request may be answered with a 5xx. The service runs under a
real uvicorn (lifespan and all) in a thread, on the shared cluster with a prefix of its own.
"""

from __future__ import annotations

import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import hypothesis
import pytest
import requests
import schemathesis
import uvicorn
from fastapi import FastAPI
from helpers import delete_prefix
from hypothesis import HealthCheck, Phase, given
from hypothesis import strategies as st

from engine import EngineSettings
from loadtest.app import create_app

pytestmark = [
    pytest.mark.cluster,
    # schemathesis' negative-mode strategies draw from `random` (its matter, not ours)
    pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisDeprecationWarning"),
]

EXAMPLES = 50
"""Examples per operation and generation mode (9 operations x 2 modes: ~800 requests)."""


WIDE = ("é", "€", "😀")
"""Characters of 2, 3 and 4 bytes in UTF-8."""


def widen(value: Any, char: str) -> Any:
    """``value`` with each string replaced by as many ``char``: the same length in characters
    (so a valid input stays valid), up to four times the bytes."""
    if isinstance(value, str):
        return char * len(value)
    if isinstance(value, dict):
        return {k: widen(v, char) for k, v in value.items()}
    if isinstance(value, list):
        return [widen(v, char) for v in value]
    return value


def cases(
    operation: schemathesis.APIOperation[Any, Any, Any, Any], mode: schemathesis.GenerationMode
) -> Any:
    """Schemathesis' cases, a quarter of them with body and path strings widened."""

    @st.composite
    def draw(draw: st.DrawFn) -> schemathesis.Case[Any]:
        case = draw(operation.as_strategy(generation_mode=mode))
        char = draw(st.sampled_from((None, None, None, *WIDE)))
        if char is not None:
            case.body = widen(case.body, char)
            case.path_parameters = widen(case.path_parameters, char)
        return case

    return draw()


def utf8_size(*values: object) -> int:
    """Bytes of the strings in ``values`` (nested), as the engine's limits count them."""
    total = 0
    stack = list(values)
    while stack:
        value = stack.pop()
        if isinstance(value, str):
            total += len(value.encode("utf-8", "surrogatepass"))
        elif isinstance(value, dict):
            stack.extend(value.values())
        elif isinstance(value, list | tuple):
            stack.extend(value)
    return total


@contextmanager
def uvicorn_in_thread(app: FastAPI) -> Iterator[str]:
    """Serve ``app`` on a free loopback port, lifespan included; yields its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, lifespan="on", log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(20)
        sock.close()


def test_reference_service_never_answers_5xx(cluster_url: str, prefix: str) -> None:
    app = create_app(EngineSettings(url=cluster_url, key_prefix=prefix))
    statuses: Counter[tuple[str, int]] = Counter()
    server_errors: list[str] = []
    try:
        with (
            uvicorn_in_thread(app) as base_url,
            requests.Session() as http,
            requests.Session() as login_http,  # its cookie jar stays out of the probes
        ):
            schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
            operations = [result.ok() for result in schema.get_all_operations()]  # type: ignore[union-attr]
            assert len(operations) >= 9, [op.label for op in operations]
            logins = iter(range(10**9))

            def fresh_token() -> str:
                # A new session per example: /logout, /rotate and /logout-all end theirs.
                r = login_http.post(f"{base_url}/login", json={"user_id": f"st{next(logins)}"})
                assert r.status_code == 200, r.text
                return str(r.json()["token"])

            for operation in operations:
                for mode in (
                    schemathesis.GenerationMode.POSITIVE,
                    schemathesis.GenerationMode.NEGATIVE,
                ):

                    @hypothesis.settings(
                        max_examples=EXAMPLES,
                        derandomize=True,  # the same examples on every run
                        database=None,
                        deadline=None,
                        phases=[Phase.explicit, Phase.generate, Phase.target],
                        suppress_health_check=list(HealthCheck),
                    )
                    @given(case=cases(operation, mode), auth=st.booleans())
                    def probe(case: schemathesis.Case[Any], auth: bool) -> None:
                        # Steer generation towards inputs that are long in UTF-8: where a limit
                        # counted in characters and one counted in bytes disagree.
                        hypothesis.target(float(utf8_size(case.body, case.path_parameters)))
                        headers = {"Authorization": f"Bearer {fresh_token()}"} if auth else None
                        response = case.call(base_url=base_url, session=http, headers=headers)
                        statuses[(case.operation.label, response.status_code)] += 1
                        if response.status_code >= 500:
                            server_errors.append(
                                f"{response.status_code} {case.as_curl_command()[:600]}\n"
                                f"{response.text[:300]}"
                            )

                    try:
                        probe()
                    except hypothesis.errors.Unsatisfiable:
                        # No parameter to break (GET /me, /healthz): nothing negative.
                        assert mode is schemathesis.GenerationMode.NEGATIVE, operation.label
    finally:
        delete_prefix(cluster_url, prefix)
    print(sorted(statuses.items()))  # shown with -s or on failure
    assert not server_errors, "\n\n".join(server_errors[:10])
    # The probes reached past authentication and validation, not only into 401 and 422.
    assert statuses[("GET /me", 200)] > 0, statuses
    assert statuses[("POST /chat/{room}", 200)] > 0, statuses
    assert statuses[("POST /login", 200)] > 0, statuses
    assert sum(statuses.values()) >= 9 * 2 * 10, statuses
