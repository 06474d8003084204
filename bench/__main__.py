"""``python -m bench [NAME] [options]``: list the benchmarks or run one."""

import sys

from . import main

sys.exit(main())
