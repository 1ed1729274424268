"""Bridges from the bus to other systems (MQTT: :mod:`zevents.bridges.mqtt`)."""
