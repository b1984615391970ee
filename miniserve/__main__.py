"""`python -m miniserve ...`: the `miniserve` command (serve, generate) without the console script on PATH."""

import sys

from miniserve.cli import main

if __name__ == "__main__":
    sys.exit(main())
