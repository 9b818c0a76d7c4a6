"""
The daemon's own log file, C{$HYPERDB_STATE_DIR/logs/daemon.log}.

Text lines from C{twisted.logger}, rotated by size and capped in number, the
files 0600.  C{hyperd} writes its own logs beside it (the supervisor passes it
the folder and its own size cap).
"""

from __future__ import annotations

from pathlib import Path

from twisted.logger import FileLogObserver, ILogObserver, formatEventAsClassicLogText
from twisted.python.logfile import LogFile

DAEMON_LOG_NAME = "daemon.log"
#: Bytes before daemon.log is rotated.
ROTATE_BYTES = 1_000_000
#: Rotated files kept (daemon.log.1 .. daemon.log.N).
KEEP_ROTATED = 4


def open_daemon_log(logs_dir: Path) -> tuple[ILogObserver, LogFile]:
    """
    Open C{daemon.log} in C{logs_dir} for appending.

    @return: an observer to add to the global log publisher, and the file
        (close it when the observer is removed).
    """
    logfile = LogFile(
        DAEMON_LOG_NAME, str(logs_dir),
        rotateLength=ROTATE_BYTES, maxRotatedFiles=KEEP_ROTATED, defaultMode=0o600,
    )
    observer = FileLogObserver(logfile, lambda event: formatEventAsClassicLogText(event))
    return observer, logfile
