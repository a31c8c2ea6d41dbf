"""python -m derive.codegen: the same as `derive codegen`."""
import sys

from . import main

sys.exit(main())
