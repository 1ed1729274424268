"""zevents: OctoPrint's event model as a headless service around a ZeroMQ bus."""
__version__ = "0.1.0"
