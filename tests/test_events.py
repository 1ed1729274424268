"""The catalogue: complete against the spec, aliases, custom events, and the `zevents events` command."""
import json
import subprocess

import pytest
import yaml

from conftest import shared_path
from zevents import events


def spec_entries():
    spec = yaml.safe_load(shared_path("spec", "events.yaml").read_text())
    for section, group in events.SPEC_SECTIONS.items():
        for name, entry in spec[section].items():
            yield group, name, entry.get("payload") or []


def test_catalogue_matches_events_yaml():
    entries = list(spec_entries())
    assert len(entries) == 69
    for group, name, keys in entries:
        spec = events.CATALOGUE.get(name)
        assert spec is not None, f"{name} missing from the catalogue"
        assert spec.group == group, name
        assert set(keys) <= set(spec.payload), f"{name}: payload keys {keys} not all in {spec.payload}"
    assert set(events.CATALOGUE) == {name for _, name, _ in entries}


def test_every_catalogue_group_is_a_wire_group():
    assert set(events.SPEC_SECTIONS.values()) == set(events.CATALOGUE_GROUPS)
    assert {spec.group for spec in events.EVENTS.values()} <= set(events.GROUPS)


@pytest.mark.parametrize("name,topic", [
    ("Dwelling", "gcode/Dwell"),
    ("Dwell", "gcode/Dwell"),
    ("GcodeScriptAfterPrintDoneRunning", "print/GcodeScriptAfterPrintDoneRunning"),
    ("GcodeScriptBeforePrintStartedFinished", "print/GcodeScriptBeforePrintStartedFinished"),
    ("LayerChanged", "gcode/LayerChanged"),
    ("MyPlugin_SomethingHappened", "custom/MyPlugin_SomethingHappened"),
])
def test_topics(name, topic):
    assert events.topic_of(name) == topic


def test_script_templates_are_not_events_themselves():
    assert events.lookup("GcodeScript${ScriptName}Running").name.startswith("GcodeScript$")
    assert events.lookup("GcodeScriptAfterPrintDoneRunning").payload == ("name", "path", "origin", "size", "owner",
                                                                         "time")
    assert events.script_event("afterPrintCancelled", "Finished") == "GcodeScriptAfterPrintCancelledFinished"
    with pytest.raises(ValueError):
        events.script_event("x", "Started")


def test_complete_payload_fills_missing_keys_with_none_and_keeps_extras():
    payload = events.complete_payload("PrintDone", {"name": "a.gcode", "extra": 1})
    assert payload == {"name": "a.gcode", "path": None, "origin": None, "size": None, "owner": None, "time": None,
                       "extra": 1}
    assert events.complete_payload("Custom_X", {"a": 1}) == {"a": 1}


def test_suggest_finds_typos():
    assert events.suggest("PrintStart") == "PrintStarted"
    assert events.suggest("printdone") == "PrintDone"
    assert events.suggest("Zzzzzzzzzz") is None


def test_events_command_json(zevents_cmd):
    out = subprocess.run(zevents_cmd + ["events", "--json"], capture_output=True, text=True, check=True).stdout
    data = json.loads(out)
    by_name = {row["name"]: row for row in data["events"]}
    assert by_name["PrintDone"]["group"] == "print"
    assert by_name["PrintDone"]["payload"] == ["name", "path", "origin", "size", "owner", "time"]
    assert by_name["LayerChanged"]["extension"] is True
    assert data["aliases"] == {"Dwelling": "Dwell"}
    assert len([r for r in data["events"] if not r["extension"]]) == 69


def test_events_command_table(zevents_cmd):
    out = subprocess.run(zevents_cmd + ["events"], capture_output=True, text=True, check=True,
                         env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"}).stdout
    assert "PositionUpdate" in out and "x, y, z, e, t, f" in out
