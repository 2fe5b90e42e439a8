"""mkdocs hooks: pages generated at build time from the code and from bench.md.

* ``settings.md``: the ``<!-- settings -->`` marker becomes a table of every
  ``EngineSettings`` field (environment variable, type, default, description), so the
  reference cannot drift from the code.
* ``benchmarks.md``: the ``<!-- bench.md -->`` marker becomes bench.md itself (the
  measured results, each with the command that produced it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from engine import EngineSettings

ROOT = Path(__file__).resolve().parent.parent


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def settings_table() -> str:
    rows = [
        "| variable | type | default | what it does |",
        "|---|---|---|---|",
    ]
    prefix = EngineSettings.model_config.get("env_prefix", "")
    for name, field in EngineSettings.model_fields.items():
        annotation = field.annotation
        kind = annotation.__name__ if isinstance(annotation, type) else str(annotation)
        kind = kind.replace("typing.", "").replace("pydantic.types.", "")
        default = repr(field.default)  # defaults are never secrets (passwords default None)
        rows.append(
            f"| `{prefix}{name.upper()}` | `{_cell(kind)}` | `{_cell(default)}` | "
            f"{_cell(field.description or '')} |"
        )
    return "\n".join(rows)


def on_page_markdown(markdown: str, page: Any, **_: Any) -> str:
    if "<!-- settings -->" in markdown:
        markdown = markdown.replace("<!-- settings -->", settings_table())
    if "<!-- bench.md -->" in markdown:
        bench = (ROOT / "bench.md").read_text(encoding="utf-8")
        # bench.md's own title would be a second h1 on the page.
        body = bench.split("\n", 1)[1] if bench.startswith("# ") else bench
        markdown = markdown.replace("<!-- bench.md -->", body)
    return markdown
