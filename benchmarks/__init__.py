"""
Benchmarks: our daemon measured side by side with the upstream Rust one.

    python -m benchmarks [--peer DIR] [--repeat N] [--quick] [--json PATH]

Each measure runs on real processes (the daemon, C{hyperd}, clients, MCP
servers) in fresh temporary state directories, on free ports outside
7485-7500, and never touches C{~/.hyperdb}.  With the upstream package
(C{--peer DIR} or C{HYPERDB_PEER_DIR}), every measure that makes sense for
it runs for both, alternating ours and theirs within each repetition.
Every process started is stopped at the end, even on error or Ctrl-C.

Modules:

- C{cli}: options, the run, the table and the JSON file;
- C{measures}: the nine measures;
- C{targets}: how to start, ask, stop and kill each daemon (ours, theirs);
- C{procs}: processes, C{/proc}, ports, temporary sandboxes, cleanup;
- C{load}: the asyncio driver for many heartbeating sessions;
- C{mcpdrive}: MCP servers driven over stdio with the SDK's client;
- C{pinger}: fresh-connection C{PING} timing (also run as a script);
- C{report}: statistics, targets, the table.
"""
