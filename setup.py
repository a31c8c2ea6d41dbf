"""Build hook: the wheel carries ``templates/`` and ``generated/`` as package data.

They live once in the repository, at the top of the checkout (the design card's layout, and
where ``make codegen`` writes); ``build_py`` copies them into the built package as
``derive/_data/templates`` and ``derive/_data/generated``, where :mod:`derive.resources` finds
them through ``importlib.resources``.  Nothing is copied inside the repository, so there is no
second copy to drift.  An editable install skips the copy: it runs from the checkout, which
``derive.resources`` reads directly.  Everything else is declared in ``pyproject.toml``.
"""
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py as _build_py

ROOT = Path(__file__).resolve().parent
DATA_FOLDERS = ("templates", "generated")


class build_py(_build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False) or self.dry_run:
            return
        target = Path(self.build_lib) / "derive" / "_data"
        for name in DATA_FOLDERS:
            src = ROOT / name
            if not src.is_dir():
                raise SystemExit(f"setup.py: {src} is missing; build from a checkout or an sdist of derive")
            dst = target / name
            if dst.exists():
                shutil.rmtree(dst)
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.tmp"))


setup(cmdclass={"build_py": build_py})
