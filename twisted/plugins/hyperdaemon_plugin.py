from twisted.application.service import ServiceMaker

hyperdaemon = ServiceMaker(
    "hyperdaemon",
    "hyperdaemon.daemon.tap",
    "The per-user hyperdb-mcp daemon: one shared hyperd for every MCP server.",
    "hyperdaemon",
)
