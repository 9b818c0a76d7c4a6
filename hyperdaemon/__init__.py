"""
hyperdaemon: one shared Hyper database server (C{hyperd}) per user and machine.

A small Twisted daemon owns the C{hyperd}; the MCP servers of every AI
assistant find it (or start it) through its health port and talk to C{hyperd}
directly over libpq.  See README.md for the commands and files.
"""

__version__ = "1.2.0"

#: The first token after C{PONG} in the reply to C{PING}: it names the
#: protocol family (shared with the upstream Rust daemon), not this package.
PRODUCT = "hyperdb-mcp"
