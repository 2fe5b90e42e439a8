"""The storage layout is stated once (engine/_keys.py) and Lua and Python agree on it."""

from __future__ import annotations

import re

from engine import SessionEngine, SessionState
from engine._keys import HEADER_FIELDS, HEADER_LEN, lua_layout, slot_of_tag
from engine._scripts import SCRIPT_NAMES, lua_dir, scripts
from engine._transport import pack


def test_header_fields_are_contiguous_and_end_at_the_header_length() -> None:
    at = 0
    for field in HEADER_FIELDS:
        assert field.start == at
        at += field.width
    assert at == HEADER_LEN


def test_every_script_starts_with_the_generated_layout_it_uses() -> None:
    full = lua_layout().splitlines()
    for name, script in scripts().items():
        source = script.source.decode()
        header = lua_layout(used_by=source)  # declares only names the script uses
        assert source.startswith(header), name
        assert set(header.splitlines()) <= set(full), name
    validate = scripts()["validate"].source.decode()
    assert "F_IDLE" in validate and "PACK_FORMAT" not in validate


def test_no_script_writes_an_offset_or_a_key_part_of_its_own() -> None:
    """Offsets and key parts come from the generated constants, never from literals."""
    for name in ("_prelude", *SCRIPT_NAMES):
        text = (lua_dir() / f"{name}.lua").read_text()
        code = "\n".join(line.split("--", 1)[0] for line in text.splitlines())
        assert not re.search(r"string\.sub\(v, *\d+, *\d+\)", code), name
        assert not re.search(r"'[sucr]:'", code), name
        assert "%0" not in code, name  # the number formats live in PACK_FORMAT


async def test_python_reads_what_lua_wrote(engine: SessionEngine) -> None:
    new = await engine.create(
        user_id="layout:ü", data={"k": "v"}, state=SessionState.PENDING, idle_ttl=60
    )
    tag = new.token.split(".")[0]
    key = engine.keys.session(tag, new.session.session_id)
    raw = await engine.transport.call(slot_of_tag(tag), pack(("GET", key)))
    fields = {f.name: raw[f.slice] for f in HEADER_FIELDS}
    assert fields["state"] == b"p"
    assert int(fields["idle"]) == 60_000
    assert int(fields["version"]) == 1
    created_ms = int(fields["created"])
    assert abs(created_ms / 1000 - new.session.created_at.timestamp()) < 0.002
    assert int(fields["absolute"]) - created_ms == round(engine.settings.absolute_ttl * 1000)
    assert raw[HEADER_LEN:].split(b"|", 1) == [b"layout%3A%C3%BC", b'{"k":"v"}']
