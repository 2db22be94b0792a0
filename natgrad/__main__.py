"""``python -m natgrad``: the same as the ``natgrad`` command."""

import sys

from natgrad.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
