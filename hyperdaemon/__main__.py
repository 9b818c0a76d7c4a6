"""C{python -m hyperdaemon} is C{hyperdb-mcp}."""

import sys

from hyperdaemon.mcp.launcher import main  # the launcher without the parser; the rest: cli

sys.exit(main())
