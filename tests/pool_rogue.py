"""A would-be pool member that runs the real member code with one lie: its certificate's
evidence binds another key than the certificate's (`python tests/pool_rogue.py ARGS...`,
the arguments of `python -m teeflow.executor.pool.member`)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from teeflow.executor.pool import member  # noqa: E402
from tests.pool_forge import other_key_identity  # noqa: E402

member.make_member_identity = other_key_identity  # type: ignore[assignment]

if __name__ == "__main__":
    member.main()
