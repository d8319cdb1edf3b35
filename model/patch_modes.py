"""How MPEMD places its patches at prediction (METHOD.md): ``random`` (seeded per image) or ``grid``.

Plain Python, so settings and command lines name the modes without importing torch; the geometry
is ``model.patches``.
"""

from __future__ import annotations

import typing
from typing import Literal

PatchMode = Literal["random", "grid"]
PATCH_MODES: tuple[str, ...] = typing.get_args(PatchMode)
