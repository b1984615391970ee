"""`python -m miniserve ...`: the `miniserve` command (serve, generate) without the console script on PATH."""

import sys

from miniserve.cli import main

sys.exit(main())
