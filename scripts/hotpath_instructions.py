"""Client instructions per validation, for callgrind (deterministic, unlike the clock).

    python -m engine cluster up        # prints URL
    valgrind --tool=callgrind python scripts/hotpath_instructions.py URL validate 640
    valgrind --tool=callgrind python scripts/hotpath_instructions.py URL validate 3200
    # per validate = (instructions at 3200 - at 640) / 2560; same with validate_many.

``validate``: N validations in ``asyncio.gather``s of 64. ``validate_many``: one call of N
tokens. Run it from two checkouts (``git worktree``, PYTHONPATH=checkout) to compare
commits: bench.md section 1b.
"""

from __future__ import annotations

import asyncio
import sys

from engine import EngineSettings, SessionEngine


async def main(url: str, mode: str, n: int) -> None:
    async with SessionEngine(EngineSettings(url=url, key_prefix="cg", command_timeout=60)) as eng:
        tokens = [(await eng.create(user_id=f"u{i}")).token for i in range(64)]
        if mode == "validate_many":
            assert all(await eng.validate_many(tokens * (n // 64)))
            return
        for _ in range(n // 64):
            await asyncio.gather(*(eng.validate(t) for t in tokens))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
