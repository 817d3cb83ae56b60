"""`python -m pqpatch ...`: the same as the `pqpatch` command."""

import sys

from .cli import main

sys.exit(main())
