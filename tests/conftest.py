import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
NOTE = ROOT / "derive" / "derivations" / "focal_loss_note.toml"


@pytest.fixture(scope="session")
def note_path():
    return NOTE


@pytest.fixture(scope="session")
def note_report():
    """The note verified once per session (about 3 s)."""
    from derive.prover.verify import verify_paths

    return verify_paths([NOTE])
