"""python -m derive.docs: build docs/ (see derive.docs)."""
import sys

from derive.docs import main

sys.exit(main())
