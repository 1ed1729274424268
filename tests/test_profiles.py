"""Printer profiles: OctoPrint's format and rules, stored atomically, changed through the CLI with their events."""
from __future__ import annotations

import json
import subprocess

import pytest
import yaml

from tests.conftest import collect
from zevents.printer.profiles import DEFAULT_ID, DEFAULT_PROFILE, ProfileError, ProfileStore, sanitize_id, validate


def test_the_built_in_default_is_octoprints_and_valid(tmp_path):
    store = ProfileStore(tmp_path / "printerProfiles")
    profile = store.get()
    assert profile["id"] == DEFAULT_ID and profile["model"] == "Generic RepRap Printer"
    assert profile["volume"] == {"width": 200.0, "depth": 200.0, "height": 200.0, "formFactor": "rectangular",
                                 "origin": "lowerleft", "custom_box": False}
    assert profile["axes"]["z"] == {"speed": 200, "inverted": False}
    assert validate(profile) == []
    assert store.ids() == [DEFAULT_ID]


def test_a_partial_profile_is_merged_over_the_default_and_read_back(tmp_path):
    store = ProfileStore(tmp_path)
    saved, replaced = store.save({"id": "mk3s", "name": "Prusa MK3S", "volume": {"width": 250, "depth": 210}})
    assert not replaced
    again = ProfileStore(tmp_path).get("mk3s")
    assert again == saved
    assert again["volume"]["width"] == 250 and again["volume"]["height"] == 200.0
    assert yaml.safe_load((tmp_path / "mk3s.profile").read_text())["name"] == "Prusa MK3S"
    assert store.ids() == [DEFAULT_ID, "mk3s"]


@pytest.mark.parametrize("change, key", [
    ({"volume": {"width": -1}}, "volume.width"),
    ({"volume": {"depth": float("nan")}}, "volume.depth"),
    ({"volume": {"formFactor": "triangle"}}, "volume.formFactor"),
    ({"extruder": {"count": 2}}, "extruder.offsets"),
    ({"extruder": {"count": 0, "offsets": []}}, "extruder.count"),
    ({"extruder": {"nozzleDiameter": "0.4"}}, "extruder.nozzleDiameter"),
    ({"axes": {"x": {"speed": 0}}}, "axes.x.speed"),
    ({"motion": {"max_acceleration": {"x": float("inf")}}}, "motion.max_acceleration.x"),
    ({"volume": {"custom_box": {"x_min": 5, "y_min": 0, "z_min": 0, "x_max": 1, "y_max": 1, "z_max": 1}}},
     "volume.custom_box"),
    ({"bedSize": 3}, "bedSize"),
])
def test_a_bad_key_is_named_and_nothing_is_written(tmp_path, change, key):
    store = ProfileStore(tmp_path)
    with pytest.raises(ProfileError) as error:
        store.save(dict(change, id="bad"))
    assert key in str(error.value)
    assert not (tmp_path / "bad.profile").exists()
    assert [p.name for p in tmp_path.iterdir()] == []       # no temporary file left behind either


def test_ids_are_sanitized_as_octoprint_does():
    assert sanitize_id("My Printer #2") == "My_Printer_2"
    assert sanitize_id("../../etc/passwd") == "etcpasswd"
    with pytest.raises(ProfileError):
        sanitize_id("///")


def test_the_default_and_the_current_profile_cannot_be_removed(tmp_path):
    store = ProfileStore(tmp_path)
    store.save({"id": "a"})
    store.save({"id": "b"})
    with pytest.raises(ProfileError, match="default"):
        store.delete(DEFAULT_ID)
    store.set_default("a")
    assert store.default_id() == "a" and store.get()["id"] == "a"
    with pytest.raises(ProfileError, match="default"):
        store.delete("a")
    with pytest.raises(ProfileError, match="current"):
        store.delete("b", current="b")
    store.delete("b")
    assert store.ids() == [DEFAULT_ID, "a"]
    with pytest.raises(ProfileError, match="no printer profile 'b'"):
        store.delete("b")


def test_an_existing_profile_is_not_overwritten_by_add(tmp_path):
    store = ProfileStore(tmp_path)
    store.save({"id": "a", "name": "first"})
    with pytest.raises(ProfileError, match="exists"):
        store.save({"id": "a", "name": "second"})
    assert store.get("a")["name"] == "first"
    assert store.save({"id": "a", "name": "second"}, allow_overwrite=True)[1] is True


def test_motion_limits_default_to_marlins():
    motion = DEFAULT_PROFILE["motion"]
    assert motion["max_feedrate"]["z"] == 12.0 and motion["max_acceleration"]["e"] == 10000.0


@pytest.fixture
def node_config(short_tmp, bus_config, tmp_path):
    path = short_tmp / "zevents.yaml"
    path.write_text(json.dumps({"bus": {"node": bus_config.node, "publish": bus_config.publish,
                                        "ingest": bus_config.ingest, "replay": bus_config.replay,
                                        "heartbeat": bus_config.heartbeat},
                                "data_dir": str(tmp_path / "data")}))
    return path


def zevents(zevents_cmd, config, *args):
    return subprocess.run(zevents_cmd + list(args) + ["-c", str(config)], capture_output=True, text=True,
                          timeout=60)


def test_cli_add_edit_rm_publish_the_profile_events(running_broker, bus_config, node_config, zevents_cmd,
                                                    tmp_path):
    from zevents import bus

    source = tmp_path / "ender.yaml"
    source.write_text("id: ender3\nname: Creality Ender-3\nvolume: {width: 220, depth: 220, height: 250}\n")
    with bus.Subscriber(bus_config, groups=["profile"]) as sub:
        added = zevents(zevents_cmd, node_config, "profile", "add", str(source))
        assert added.returncode == 0, added.stderr
        assert added.stdout.strip() == "ender3"
        edited = zevents(zevents_cmd, node_config, "profile", "edit", "ender3", "volume.height=300",
                         "extruder.nozzleDiameter=0.6")
        assert edited.returncode == 0, edited.stderr
        refused = zevents(zevents_cmd, node_config, "profile", "edit", "ender3", "volume.width=-5")
        assert refused.returncode == 2 and "volume.width" in refused.stderr
        shown = zevents(zevents_cmd, node_config, "profile", "show", "ender3", "--json")
        profile = json.loads(shown.stdout)
        assert profile["volume"] == {"width": 220, "depth": 220, "height": 300, "formFactor": "rectangular",
                                     "origin": "lowerleft", "custom_box": False}
        assert profile["extruder"]["nozzleDiameter"] == 0.6
        removed = zevents(zevents_cmd, node_config, "profile", "rm", "ender3")
        assert removed.returncode == 0, removed.stderr
        events = collect(sub, 3)
    assert [(e.name, e.payload) for e in events] == [
        ("PrinterProfileAdded", {"identifier": "ender3"}),
        ("PrinterProfileModified", {"identifier": "ender3"}),
        ("PrinterProfileDeleted", {"identifier": "ender3"}),
    ]
    listed = json.loads(zevents(zevents_cmd, node_config, "profile", "ls", "--json").stdout)
    assert list(listed["profiles"]) == [DEFAULT_ID] and listed["default"] == DEFAULT_ID


def test_cli_without_a_broker_keeps_the_change_and_warns(node_config, zevents_cmd, tmp_path):
    source = tmp_path / "p.yaml"
    source.write_text("{id: solo}\n")
    result = zevents(zevents_cmd, node_config, "profile", "add", str(source))
    assert result.returncode == 0
    assert "PrinterProfileAdded not published" in result.stderr
    assert (tmp_path / "data" / "printerProfiles" / "solo.profile").is_file()


def test_outside_volume_names_the_sides_a_print_crosses():
    from zevents.printer.profiles import merge as merged, outside_volume

    area = {"minX": 10.0, "maxX": 190.0, "minY": -3.0, "maxY": 150.0, "minZ": 0.2, "maxZ": 210.0}
    assert outside_volume(DEFAULT_PROFILE, area) == ["y_min", "z_max"]       # a purge line at Y-3, too tall
    assert outside_volume(DEFAULT_PROFILE, dict(area, minY=0.0, maxZ=200.0)) == []
    centred = merged(DEFAULT_PROFILE, {"volume": {"origin": "center"}})
    assert outside_volume(centred, {"minX": -50.0, "maxX": 50.0, "minY": -50.0, "maxY": 50.0, "minZ": 0.0,
                                    "maxZ": 10.0}) == []
    round_bed = merged(DEFAULT_PROFILE, {"volume": {"formFactor": "circular", "origin": "center"}})
    corner = {"minX": -95.0, "maxX": 95.0, "minY": -95.0, "maxY": 95.0, "minZ": 0.0, "maxZ": 1.0}
    assert outside_volume(round_bed, corner) == ["radius"]                  # inside the square, not the circle
    assert outside_volume(DEFAULT_PROFILE, {}) == []


def test_the_virtual_printer_gets_the_profiles_extruders(short_tmp, bus_config, running_broker, zevents_cmd):
    from zevents import bus

    data = short_tmp / "data"
    ProfileStore(data / "printerProfiles").save({"id": "twohead", "extruder": {"count": 2,
                                                                               "offsets": [[0, 0], [20, 0]]}})
    config = short_tmp / "p.yaml"
    config.write_text(json.dumps({
        "bus": {"node": bus_config.node, "publish": bus_config.publish, "ingest": bus_config.ingest,
                "replay": bus_config.replay, "heartbeat": bus_config.heartbeat},
        "printer": {"commands": f"ipc://{short_tmp}/printer.sock", "profile": "twohead",
                    "virtual": {"speed": 0}},
        "data_dir": str(data)}))
    with bus.Subscriber(bus_config, groups=["comm"]) as subscriber:
        process = subprocess.Popen(zevents_cmd + ["printer", "--virtual", "-c", str(config)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            def two_tools():
                envelope = subscriber.recv(1.0)
                return envelope is not None and envelope.name == "Temperature" and \
                    set(envelope.payload["tools"]) == {"T0", "T1"}
            from tests.conftest import wait_for

            wait_for(two_tools, 60, 0, "a Temperature report of two extruders")
        finally:
            process.terminate()
            process.wait(20)
            process.stderr.close()
