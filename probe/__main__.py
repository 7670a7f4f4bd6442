"""`python -m probe` runs the `probe` command."""

import sys

from probe.cli import main

sys.exit(main())
