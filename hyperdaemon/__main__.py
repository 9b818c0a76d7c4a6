"""C{python -m hyperdaemon} is C{hyperdb-mcp}."""

import sys

from .cli import main

sys.exit(main())
