"""The client side: finding or spawning the daemon, and sessions on its hyperd."""
