"""The MCP side: the server and its tools."""
