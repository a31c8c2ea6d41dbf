"""python -m derive.docs: build docs/ (see derive.docs)."""
import sys

from . import main

sys.exit(main())
