"""Where derive's data files are: the templates, the generated kernels, the derivation files and
the note they transcribe.

There is one copy of each in the repository, laid out as the design card says:
``templates/`` and ``generated/`` at the top of the checkout, ``derive/derivations/`` (the
derivation files and the note ``focal_loss_gradients.md``) inside the package.  A wheel carries
the first two as package data under ``derive/_data/`` (copied there at build time by
``setup.py``'s ``build_py``; nothing is copied in the repository), so an installed derive finds
them through :mod:`importlib.resources`, and a checkout (an editable install, ``make``) finds
them at the top of the tree.

Every file also has a *logical* path, the one it has in the repository
(``templates/kernels.c.j2``, ``derive/derivations/stable_forms.toml``): generated headers
and the docs cite that path, so ``derive codegen`` from a wheel writes the same bytes as
``make codegen`` in a checkout.
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
#: The checkout's root, when this package is imported from a checkout.
CHECKOUT_ROOT = PACKAGE_DIR.parent
#: The folders that live at the top of the checkout and under ``derive/_data`` in a wheel.
DATA_FOLDERS = ("templates", "generated")
#: The note the shipped derivation files transcribe (kept beside its transcription).
NOTE_NAME = "focal_loss_gradients.md"


class DataFilesMissing(FileNotFoundError):
    """derive's data files (templates, generated kernels) are not where they should be."""


def _is_checkout(root: Path) -> bool:
    pyproject = root / "pyproject.toml"
    if not (pyproject.is_file() and all((root / d).is_dir() for d in DATA_FOLDERS)):
        return False
    try:
        return "derive.cli:main" in pyproject.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False


def _packaged_root() -> Path | None:
    try:
        root = resources.files("derive") / "_data"
    except (ModuleNotFoundError, TypeError):  # pragma: no cover - derive is always importable here
        return None
    if not root.is_dir():
        return None
    path = Path(str(root))  # a wheel installed by pip is unpacked: a real folder
    return path if path.is_dir() else None


def data_root() -> Path:
    """The folder that holds ``templates/`` and ``generated/``: the checkout's root when derive is
    imported from a checkout (the source of truth), else the installed package's ``_data``.

    Raises :class:`DataFilesMissing` when neither exists (a broken install)."""
    if _is_checkout(CHECKOUT_ROOT):
        return CHECKOUT_ROOT
    packaged = _packaged_root()
    if packaged is not None:
        return packaged
    raise DataFilesMissing(
        f"derive's data files (templates/, generated/) are missing: neither {CHECKOUT_ROOT} is a derive "
        f"checkout nor {PACKAGE_DIR / '_data'} exists; reinstall derive (pip install --force-reinstall "
        "derive-gradients) or run it from a checkout")


def _data_path(name: str) -> Path:
    try:
        return data_root() / name
    except DataFilesMissing:
        # a path that does not exist: the caller's own "is missing" error then names it
        return PACKAGE_DIR / "_data" / name


def templates_dir() -> Path:
    """The Jinja templates (``templates/`` in the checkout)."""
    return _data_path("templates")


def generated_dir() -> Path:
    """The committed generated kernels (``generated/`` in the checkout) that the runtime loads."""
    return _data_path("generated")


def derivations_dir() -> Path:
    """The shipped derivation files (``derive/derivations/``)."""
    return Path(str(resources.files("derive") / "derivations"))


def note_path() -> Path:
    """The note the shipped derivations transcribe: ``derive/derivations/focal_loss_gradients.md``."""
    return derivations_dir() / NOTE_NAME


def logical_path(path) -> str:
    """A data file's path as it is in the repository (``templates/x.j2``,
    ``derive/derivations/y.toml``), wherever it is installed; other files by their name."""
    p = Path(path).resolve()
    try:
        return p.relative_to(data_root().resolve()).as_posix()
    except (ValueError, DataFilesMissing):
        pass
    try:  # the package's own files (derive/derivations/...), inside site-packages or the checkout
        return p.relative_to(PACKAGE_DIR.parent).as_posix()
    except ValueError:
        return p.name


__all__ = ["DataFilesMissing", "data_root", "templates_dir", "generated_dir", "derivations_dir", "note_path",
           "logical_path", "NOTE_NAME"]
