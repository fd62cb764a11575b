"""`python -m blockhorn` is the `blockhorn` command."""

import sys

from blockhorn.cli import main

sys.exit(main())
