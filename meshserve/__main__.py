"""`python -m meshserve` is the `meshserve` command."""

import sys

from meshserve.cli import main

sys.exit(main())
