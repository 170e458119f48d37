"""Where the real models and images of ../shared are, and the skip when they are absent. A module
of its own (not conftest): tests/passes has a conftest too, and two conftest modules share one name."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
REAL_MODEL = SHARED / "models" / "resnet18-imagenet.pt"


def require_shared() -> None:
    if not REAL_MODEL.is_file():
        pytest.skip(f"real-model check needs ../shared ({SHARED} not present; see ../shared/README.md)")
