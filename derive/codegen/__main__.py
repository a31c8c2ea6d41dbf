"""python -m derive.codegen: the same as `derive codegen`."""
import sys

from derive.codegen import main

sys.exit(main())
