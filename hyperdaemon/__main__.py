"""C{python -m hyperdaemon} is C{hyperdb-mcp}."""

import sys

from hyperdaemon.cli import main

sys.exit(main())
