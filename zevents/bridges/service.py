"""The `zevents mqtt` process: one MQTT bridge (:mod:`zevents.bridges.mqtt`) until SIGINT/SIGTERM."""
from __future__ import annotations

import logging
import signal

from zevents import bus as zbus
from zevents.service import freeze_startup_heap

log = logging.getLogger("zevents.mqtt")


def run(config) -> int:
    """`zevents mqtt`: bridge the node's bus to the MQTT broker; 1 if it cannot start."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from zevents.bridges.mqtt import MqttBridge

    bridge = MqttBridge(config)
    try:
        bridge.start()
    except (ValueError, OSError, zbus.BusError) as exc:
        log.error("mqtt: cannot start: %s", exc)
        bridge.close(timeout=0)
        return 1

    def on_signal(signum, frame):
        bridge.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    zbus.announce_started(config, "mqtt")
    freeze_startup_heap()
    try:
        bridge.serve()
    finally:
        bridge.close()
    log.info("mqtt: stopped (%s)", ", ".join(f"{k} {v}" for k, v in sorted(bridge.stats.items())) or "idle")
    return 0
