"""The daemon: its service, health protocol, hyperd supervisor and sessions."""
