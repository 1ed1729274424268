"""`zevents farm`: every printer of every node on an MQTT broker, from the retained state topics the bridges keep
(``<base>/<node>/status`` and ``<base>/<node>/<printer>/state``), so it needs no node of its own.

The snapshot is complete without waiting on a clock: after subscribing, the farm publishes a probe to a topic of
its own and the broker delivers it after the retained messages of that subscription (one connection's packets are
handled in order), so the probe's arrival means "everything retained is here".
"""
from __future__ import annotations

import json
import queue
import sys
import time
import uuid

from zevents.bridges.settings import parse_url


class FarmError(RuntimeError):
    pass


class FarmView:
    """The farm as the retained topics describe it, kept up to date from the messages that follow."""

    def __init__(self, base: str):
        self.base = base.rstrip("/")
        self.nodes: dict = {}
        self.printers: dict = {}

    def update(self, topic: str, payload: bytes) -> bool:
        levels = topic.split("/")
        base_levels = self.base.count("/") + 1
        rest = levels[base_levels:]
        if len(rest) == 2 and rest[1] == "status":
            self.nodes[rest[0]] = payload.decode("utf-8", "replace")
            return True
        if len(rest) == 3 and rest[2] == "state":
            key = (rest[0], rest[1])
            if not payload:
                self.printers.pop(key, None)
                return True
            try:
                state = json.loads(payload)
            except ValueError:
                return False
            if isinstance(state, dict):
                state.setdefault("node", rest[0])
                state.setdefault("printer", rest[1])
                self.printers[key] = state
                return True
        return False

    def rows(self) -> list:
        rows = []
        for (node, printer), state in sorted(self.printers.items()):
            row = dict(state)
            row["node_status"] = self.nodes.get(node, "unknown")
            rows.append(row)
        return rows

    def as_dict(self) -> dict:
        return {"nodes": dict(sorted(self.nodes.items())), "printers": self.rows()}


def _connect(url: str, section: dict, inbox: queue.SimpleQueue, timeout: float):
    from zevents.bridges.mqtt import make_client

    settings = dict(section, url=url)
    client, parsed = make_client(settings, f"zevents-farm-{uuid.uuid4().hex[:8]}", None)
    connected = queue.SimpleQueue()
    client.on_connect = lambda c, u, f, rc, p: connected.put(rc)
    client.on_subscribe = lambda c, u, mid, rcs, p: inbox.put(("suback", mid))
    client.on_message = lambda c, u, m: inbox.put((m.topic, bytes(m.payload)))
    try:
        client.connect(parsed["host"], parsed["port"], 30)
    except OSError as exc:
        raise FarmError(f"cannot reach the MQTT broker at {url}: {exc}") from None
    client.loop_start()
    try:
        rc = connected.get(timeout=timeout)
    except queue.Empty:
        client.loop_stop()
        raise FarmError(f"the MQTT broker at {url} did not answer within {timeout:g} s") from None
    if rc.is_failure:
        client.loop_stop()
        raise FarmError(f"the MQTT broker at {url} refused us: {rc}")
    return client


def snapshot(url: str, base: str = "zevents", section: dict | None = None, timeout: float = 10.0,
             keep: bool = False):
    """The farm's retained state: a FarmView (and the live client and its inbox when ``keep``)."""
    inbox: queue.SimpleQueue = queue.SimpleQueue()
    client = _connect(url, section or {}, inbox, timeout)
    view = FarmView(base)
    probe = f"{view.base}/_farm/{uuid.uuid4().hex}"
    _, mid = client.subscribe([(f"{view.base}/+/status", 0), (f"{view.base}/+/+/state", 0), (probe, 0)])
    deadline = time.monotonic() + timeout
    probed = False
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise FarmError(f"no complete snapshot from {url} within {timeout:g} s")
            try:
                topic, payload = inbox.get(timeout=remaining)
            except queue.Empty:
                continue
            if topic == "suback" and payload == mid and not probed:
                client.publish(probe, b"", 0, False)
                probed = True
            elif topic == probe:
                break
            elif topic != "suback":
                view.update(topic, payload)
    except BaseException:
        client.disconnect()
        client.loop_stop()
        raise
    if keep:
        return view, client, inbox
    client.disconnect()
    client.loop_stop()
    return view


def _age(ts) -> str:
    if not ts:
        return ""
    seconds = max(0, int(time.time() - ts / 1e6))
    return f"{seconds // 60}m{seconds % 60:02d}s ago" if seconds >= 60 else f"{seconds}s ago"


def _duration(seconds) -> str:
    if seconds is None:
        return ""
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def table(view: FarmView):
    from rich.table import Table

    grid = Table(title="zevents farm", expand=False)
    for column in ("node", "printer", "state", "file", "progress", "layer", "time left", "last event"):
        grid.add_column(column)
    for row in view.rows():
        state = row.get("state_string") or row.get("state") or ""
        if row["node_status"] != "online":
            state = f"{state} (node {row['node_status']})"
        progress = row.get("progress")
        grid.add_row(row["node"], row["printer"], state, row.get("file") or "",
                     "" if progress is None else f"{progress:.0f}%", row.get("layer_text") or "",
                     _duration(row.get("time_left")),
                     f"{row.get('last_event') or ''} {_age(row.get('last_event_ts'))}".strip())
    if not view.printers:
        grid.caption = "no printers yet (is a bridge with layouts.zevents running?)"
    return grid


def run(config, url: str | None, as_json: bool, once: bool, timeout: float = 10.0) -> int:
    """`zevents farm`: print the farm once (``--json`` or ``--once``) or keep a live table until Ctrl-C."""
    section = config.get("mqtt") or {}
    url = url or section.get("url")
    base = section.get("base_topic") or "zevents"
    try:
        parse_url(url)
    except ValueError as exc:
        print(f"zevents: --mqtt: {exc}", file=sys.stderr)
        return 2
    try:
        if as_json or once:
            view = snapshot(url, base, section, timeout)
            if as_json:
                print(json.dumps(view.as_dict(), indent=2, ensure_ascii=False))
            else:
                from rich.console import Console

                Console().print(table(view))
            return 0
        view, client, inbox = snapshot(url, base, section, timeout, keep=True)
    except FarmError as exc:
        print(f"zevents: {exc}", file=sys.stderr)
        return 1
    from rich.live import Live

    try:
        with Live(table(view), refresh_per_second=4) as live:
            while True:
                try:
                    topic, payload = inbox.get(timeout=1.0)
                except queue.Empty:
                    live.update(table(view))  # ages move on
                    continue
                if topic != "suback" and view.update(topic, payload):
                    live.update(table(view))
    except KeyboardInterrupt:
        return 0
    finally:
        client.disconnect()
        client.loop_stop()
