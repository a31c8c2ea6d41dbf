import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
NOTE = ROOT / "derive" / "derivations" / "focal_loss_note.toml"
# the proof cache of a test run: one folder of its own, shared by the run's tests (a proof found once is
# replayed, not searched again) and never the user's ~/.cache/derive
if "DERIVE_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["DERIVE_CACHE_DIR"] = tempfile.mkdtemp(prefix="derive-test-cache-")


@pytest.fixture(scope="session")
def note_path():
    return NOTE


@pytest.fixture(scope="session")
def note_report():
    """The note verified once per session (about 3 s)."""
    from derive.prover.verify import verify_paths

    return verify_paths([NOTE])
