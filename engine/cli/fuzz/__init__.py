"""``python -m engine fuzz TARGET``: coverage-guided fuzzing of every public entry.

Each target turns fuzzer bytes into arguments of one family of public entries and checks
one invariant: the call gives a clear engine error (an ``EngineError``; for settings,
pydantic's ``ValidationError``) or a correct result, never another exception, never a
write after a refusal, never a secret (password, tag secret, the token given) in the
text of an error.

=========  ======  ==================================================================
target     Redis   entries
=========  ======  ==================================================================
token      no      ``parse_token``; ``validate``/``validate_many``/``get``/``revoke``/
                   ``update``/``rotate``/``revoke_user(except_token=)`` with any object:
                   what does not parse never reaches Redis
data       no      ``create``/``update`` arguments (data dicts and models, ids, state,
                   TTLs, expected_version): refused before any I/O, or accepted
settings   no      ``EngineSettings`` from keyword arguments and from ``ENGINE_*``
                   variables; ``SessionEngine(...)`` built from what is accepted
url        no      ``EngineSettings(url=...)`` and ``open()`` with odd URLs holding a
                   password, on an event loop that connects nowhere: a clear error without
                   the password, no connection to a server the URL does not name
http       no      ``engine.fastapi``'s ``require_session``/``optional_session``/
                   ``current_token``/``require_user`` behind a tiny app, with any
                   ``Authorization``/``Cookie`` bytes and a stub engine
ids        yes     user and room ids through create, rotate, list, revoke_user and chat,
                   and session data through create/update, round-tripped; a refusal
                   leaves no key under the prefix (and a refused update changes nothing)
chat       yes     ``chat_append`` messages (and ``chat_owned_by_sessions``), read back
                   with ``chat_history``; a refusal leaves no key under the prefix
=========  ======  ==================================================================

Targets that need Redis start a local three-primary cluster (``LocalCluster``) unless
``--url`` names one (their keys live under a fresh prefix, deleted afterwards). Each
target runs in a child process: atheris instruments the engine's modules before they are
imported, and libFuzzer ends that process itself. Exit status: 0 when every target ran
its time without breaking an invariant, 1 otherwise (the input is printed and written to
the artifacts directory; ``--reproduce FILE`` runs it again).

The generators and checks are also driven by Hypothesis in ``tests/test_fuzz.py`` through
the same ``Source`` interface, so both fuzzers test the same invariants (there the token
checks also run on the cluster: near misses of a live token never validate).

Modules: ``_core`` (sources, reference verdicts, ``expect``), ``_gen`` (generators),
``_targets`` and ``_http`` (one ``check_*`` per target), ``_cli`` (the command).
"""

from ._cli import TARGETS, configure, execute, main
from ._core import (
    MAX_ID_BYTES,
    MAX_MESSAGE,
    MAX_PAYLOAD,
    TAG_SECRET,
    BytesSource,
    InvariantBroken,
    Source,
)
from ._http import HttpApp, check_http
from ._targets import (
    JailLoop,
    RedisContext,
    check_chat,
    check_create_args,
    check_ids,
    check_settings,
    check_token,
    check_url,
    engine_fields,
)

__all__ = [
    "MAX_ID_BYTES",
    "MAX_MESSAGE",
    "MAX_PAYLOAD",
    "TAG_SECRET",
    "TARGETS",
    "BytesSource",
    "HttpApp",
    "InvariantBroken",
    "JailLoop",
    "RedisContext",
    "Source",
    "check_chat",
    "check_create_args",
    "check_http",
    "check_ids",
    "check_settings",
    "check_token",
    "check_url",
    "configure",
    "engine_fields",
    "execute",
    "main",
]
