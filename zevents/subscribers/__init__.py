"""Services that subscribe to the bus and act on events (the hooks service: ``zevents.subscribers.hooks``)."""
