"""The gateway: OctoPrint's REST API and push socket, users and keys, so OctoPrint's clients work unchanged."""
