"""Slicing with the real slicers: models checked first, profiles stored and resolved, runs niced and bounded."""
from __future__ import annotations

import re
import struct
import zipfile
from pathlib import Path

import pytest

from zevents.printer.profiles import DEFAULT_PROFILE, merge
from zevents.slicing import models, slicers
from zevents.slicing.jobs import SliceRun
from zevents.slicing.profiles import SlicingProfileError, SlicingProfiles, sanitize_name

CUBE_TRIANGLES = [
    ((0, 0, 0), (1, 1, 0), (1, 0, 0)), ((0, 0, 0), (0, 1, 0), (1, 1, 0)),
    ((0, 0, 1), (1, 0, 1), (1, 1, 1)), ((0, 0, 1), (1, 1, 1), (0, 1, 1)),
    ((0, 0, 0), (1, 0, 0), (1, 0, 1)), ((0, 0, 0), (1, 0, 1), (0, 0, 1)),
    ((0, 1, 0), (1, 1, 1), (1, 1, 0)), ((0, 1, 0), (0, 1, 1), (1, 1, 1)),
    ((0, 0, 0), (0, 0, 1), (0, 1, 1)), ((0, 0, 0), (0, 1, 1), (0, 1, 0)),
    ((1, 0, 0), (1, 1, 0), (1, 1, 1)), ((1, 0, 0), (1, 1, 1), (1, 0, 1)),
]


def cube_stl(path: Path, size: float = 20.0, binary: bool = True) -> Path:
    """A closed cube mesh of ``size`` mm, written by the test (binary or ASCII STL)."""
    if binary:
        data = bytearray(b"zevents test cube".ljust(80, b" ") + struct.pack("<I", len(CUBE_TRIANGLES)))
        for triangle in CUBE_TRIANGLES:
            data += struct.pack("<3f", 0, 0, 0)
            for vertex in triangle:
                data += struct.pack("<3f", *(c * size for c in vertex))
            data += b"\0\0"
        path.write_bytes(bytes(data))
    else:
        lines = ["solid cube"]
        for triangle in CUBE_TRIANGLES:
            lines += ["  facet normal 0 0 0", "    outer loop"]
            lines += [f"      vertex {' '.join(f'{c * size:g}' for c in v)}" for v in triangle]
            lines += ["    endloop", "  endfacet"]
        path.write_text("\n".join(lines + ["endsolid cube", ""]))
    return path


def needs(slicer_id: str) -> slicers.Slicer:
    slicer = slicers.find(slicer_id)
    if not slicer.available:
        pytest.skip(slicer.problem)
    return slicer


def profile(**volume) -> dict:
    return merge(DEFAULT_PROFILE, {"volume": volume}) if volume else merge(DEFAULT_PROFILE, {})


# --- models -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("binary", [True, False])
def test_stl_bounds_binary_and_ascii(tmp_path, binary):
    bounds = models.inspect(cube_stl(tmp_path / "c.stl", 12.5, binary))
    assert bounds.size == (12.5, 12.5, 12.5) and bounds.facets == 12


def test_obj_and_3mf_bounds(tmp_path):
    obj = tmp_path / "c.obj"
    obj.write_text("v 0 0 0\nv 10 0 0\nv 10 5 0\nv 0 0 3\nf 1 2 3\nf 1 2 4\n")
    assert models.inspect(obj).size == (10, 5, 3)
    three = tmp_path / "c.3mf"
    with zipfile.ZipFile(three, "w") as archive:
        archive.writestr("3D/3dmodel.model", '<model><resources><object><mesh><vertices>'
                         '<vertex x="1" y="2" z="3"/><vertex x="4" y="8" z="3"/><vertex x="1" y="2" z="9"/>'
                         '</vertices><triangles><triangle v1="0" v2="1" v3="2"/></triangles></mesh></object>'
                         '</resources></model>')
    assert models.inspect(three).size == (3, 6, 6)


@pytest.mark.parametrize("name, content, message", [
    ("notes.txt", b"hello", "not a model file"),
    ("empty.stl", b"", "too short"),
    ("noise.stl", bytes(range(256)) * 3, "not an STL file"),
    ("nofacets.stl", b"solid x\nendsolid x\n", "empty"),
    ("truncated.stl", b"x" * 80 + struct.pack("<I", 1000) + b"\0" * 50, "not an STL"),
    ("fake.3mf", b"PK not really", "not a 3MF"),
])
def test_what_is_not_a_usable_model_is_named(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(models.ModelError, match=message):
        models.inspect(path)


def test_a_model_larger_than_the_bed_is_refused(tmp_path):
    bounds = models.inspect(cube_stl(tmp_path / "c.stl", 150))
    models.check_fits(bounds, profile())
    with pytest.raises(models.ModelError, match="larger than the build volume"):
        models.check_fits(bounds, profile(width=100.0, depth=100.0))
    with pytest.raises(models.ModelError, match="larger"):
        models.check_fits(bounds, profile(height=100.0))
    with pytest.raises(models.ModelError, match="circular"):
        models.check_fits(bounds, profile(formFactor="circular", width=200.0, depth=200.0))


# --- slicers ------------------------------------------------------------------------------------------------------

def test_progress_lines_of_each_slicer():
    assert slicers.progress("prusaslicer", "20 => Generating perimeters\n") == 0.2
    assert slicers.progress("prusaslicer", "[info] Slicing volumes...") is None
    assert slicers.progress("slic3r", "=> Infilling layers") == 0.7
    assert slicers.progress("curaengine", "Progress:export:124:248 \t0.5%") == 0.5
    assert slicers.progress("curaengine", "Progress: slice accomplished in 0.000s") is None


def test_error_message_keeps_the_slicers_words():
    output = ("[2026-12-07 22:05:31.058] [0x7f] [trace]   Initializing StaticPrintConfigs\n"
              "[2026-12-07 22:05:31.065] [0x7f] [error]   stl_open_count_facets: The input is an empty file\n"
              "broken.stl: Loading of a model file failed.\n")
    assert slicers.error_message(output) == ("stl_open_count_facets: The input is an empty file / "
                                             "broken.stl: Loading of a model file failed.")


def test_a_missing_slicer_says_how_to_install_it(tmp_path):
    from zevents import config

    cfg = config.load(text=f"slicing:\n  slic3r:\n    path: {tmp_path}/no-such-slicer\n") if \
        "slicing" in config.SCHEMA else None
    slicer = slicers.find("slic3r", cfg) if cfg else slicers.Slicer("slic3r", "Slic3r", ("x",), "slic3r", ".ini",
                                                                    True)
    assert not slicer.available
    assert "apt-get install slic3r" in slicer.as_dict()["hint"]


# --- profiles -----------------------------------------------------------------------------------------------------

def test_flat_ini_profile_first_is_default_and_bad_lines_refused(tmp_path):
    store = SlicingProfiles(tmp_path)
    ini = tmp_path / "fine.ini"
    ini.write_text("# exported\nlayer_height = 0.3\nfill_density = 15%\n")
    assert store.add("slic3r", "Fine Detail", str(ini)) == ("Fine_Detail", False)
    assert store.default("slic3r") == "Fine_Detail"
    assert "layer_height = 0.3" in store.show("slic3r", "Fine_Detail")
    assert store.add("slic3r", "Fine Detail", str(ini)) == ("Fine_Detail", True)
    bad = tmp_path / "bad.ini"
    bad.write_text("layer_height = 0.3\nthis is not a setting\n")
    with pytest.raises(SlicingProfileError, match=r"bad.ini:2"):
        store.add("slic3r", "bad", str(bad))
    assert store.names("slic3r") == ["Fine_Detail"]
    store.remove("slic3r", "Fine_Detail")
    assert store.names("slic3r") == [] and store.default("slic3r") is None
    with pytest.raises(SlicingProfileError, match="unknown slicer"):
        store.add("simplify3d", "x", str(ini))


def test_a_bundle_is_resolved_through_its_inherits_chains(tmp_path):
    bundle = tmp_path / "bundle.ini"
    bundle.write_text("[print:*common*]\nlayer_height = 0.2\nperimeters = 2\n"
                      "[print:Fast]\ninherits = *common*\nlayer_height = 0.3\n"
                      "[filament:PLA]\ntemperature = 210\n"
                      "[printer:*base*]\nbed_shape = 0x0,250x0,250x210,0x210\nnozzle_diameter = 0.4\n"
                      "[printer:MyPrinter]\ninherits = *base*\nnozzle_diameter = 0.6\n")
    store = SlicingProfiles(tmp_path / "store")
    with pytest.raises(SlicingProfileError, match="--filament NAME"):
        store.add("prusaslicer", "x", str(bundle), {"print": "Fast", "printer": "MyPrinter"})
    with pytest.raises(SlicingProfileError, match="did you mean 'Fast'"):
        store.add("prusaslicer", "x", str(bundle), {"print": "Fastt", "printer": "MyPrinter", "filament": "PLA"})
    store.add("prusaslicer", "fast", str(bundle), {"print": "Fast", "printer": "MyPrinter", "filament": "PLA"})
    text = store.show("prusaslicer", "fast")
    assert "layer_height = 0.3" in text and "perimeters = 2" in text and "nozzle_diameter = 0.6" in text
    assert "temperature = 210" in text and "inherits" not in text


def test_the_real_prusaslicer_vendor_bundle_resolves_and_slices(tmp_path):
    vendor = Path("/usr/share/PrusaSlicer/profiles/PrusaResearch.ini")
    if not vendor.is_file():
        pytest.skip("PrusaSlicer's vendor profiles are not installed")
    slicer = needs("prusaslicer")
    store = SlicingProfiles(tmp_path / "store")
    store.add("prusaslicer", "mk3s", str(vendor), {"printer": "Original Prusa i3 MK3S & MK3S+",
                                                   "print": "0.20mm QUALITY @MK3", "filament": "Prusament PLA"})
    out = tmp_path / "cube.gcode"
    outcome = SliceRun(slicer, str(cube_stl(tmp_path / "c.stl")), str(store.resolve("prusaslicer", "mk3s")),
                       merge(DEFAULT_PROFILE, {"volume": {"width": 250.0, "depth": 210.0}}), str(out)).run()
    assert outcome.status == "done", outcome.reason
    assert "; layer_height = 0.2" in out.read_text()


def test_cura_profiles_from_a_definition_and_from_settings(tmp_path):
    store = SlicingProfiles(tmp_path)
    definition = tmp_path / "mine.def.json"
    definition.write_text('{"version": 2, "name": "Mine", "inherits": "fdmprinter", "metadata": {}, '
                          '"overrides": {"machine_width": {"default_value": 180}}}')
    store.add("curaengine", "mine", str(definition), settings={"layer_height": 0.15})
    saved = store.show("curaengine", "mine")
    assert '"layer_height": "0.15"' in saved and "mine.def.json" in saved
    settings = tmp_path / "s.json"
    settings.write_text('{"definition": "creality_ender3", "settings": {"infill_sparse_density": 20}}')
    store.add("curaengine", "ender", str(settings))
    assert '"definition": "creality_ender3"' in store.show("curaengine", "ender")
    junk = tmp_path / "junk.json"
    junk.write_text("[1, 2]")
    with pytest.raises(SlicingProfileError, match="JSON object"):
        store.add("curaengine", "junk", str(junk))
    store.remove("curaengine", "mine")
    assert not (tmp_path / "curaengine" / "mine.def.json").exists()


def test_names_follow_octoprints_rule():
    assert sanitize_name("0.2mm Fast (PLA)") == "0.2mm_Fast_(PLA)"
    assert sanitize_name("../../x") == "x"


# --- runs ---------------------------------------------------------------------------------------------------------

def _xy_range(gcode: str) -> tuple:
    xs, ys = [], []
    for line in gcode.splitlines():
        if line.startswith(("G1 ", "G0 ")) and " E" in line:
            x = re.search(r" X(-?[\d.]+)", line)
            y = re.search(r" Y(-?[\d.]+)", line)
            if x and y:
                xs.append(float(x[1]))
                ys.append(float(y[1]))
    return min(xs), max(xs), min(ys), max(ys)


@pytest.mark.parametrize("slicer_id", ["prusaslicer", "slic3r", "curaengine"])
def test_the_printer_profiles_bed_reaches_the_slicer(tmp_path, slicer_id):
    """A 20 mm cube lands in the middle of a 300 × 250 bed: the G-code's extrusions centre on (150, 125)."""
    slicer = needs(slicer_id)
    out = tmp_path / "out.gcode"
    progress = []
    printer = merge(DEFAULT_PROFILE, {"volume": {"width": 300.0, "depth": 250.0}})
    outcome = SliceRun(slicer, str(cube_stl(tmp_path / "c.stl")), None, printer, str(out),
                       on_progress=progress.append).run()
    assert outcome.status == "done", outcome.reason
    x0, x1, y0, y1 = _xy_range(out.read_text())
    assert abs((x0 + x1) / 2 - 150) < 3 and abs((y0 + y1) / 2 - 125) < 3, (x0, x1, y0, y1)
    assert x1 - x0 < 40 and y1 - y0 < 40            # the cube (+ skirt), not something else
    assert progress and progress == sorted(progress) and progress[-1] <= 1.0


@pytest.mark.parametrize("slicer_id", ["prusaslicer", "slic3r"])
def test_a_broken_model_fails_with_a_reason_and_leaves_nothing(tmp_path, slicer_id):
    slicer = needs(slicer_id)
    broken = tmp_path / "broken.stl"
    broken.write_bytes(b"solid x\n  facet normal 0 0 0\n    outer loop\n      vertex 0 0 0\nendsolid\n")
    out = tmp_path / "out.gcode"
    outcome = SliceRun(slicer, str(broken), None, profile(), str(out)).run()
    assert outcome.status == "failed" and outcome.reason
    assert not out.exists()


def test_a_slicer_crash_and_a_timeout_end_in_failed(tmp_path):
    crash = tmp_path / "crash"
    crash.write_text("#!/bin/sh\necho '[error] something broke inside' >&2\nkill -SEGV $$\n")
    crash.chmod(0o755)
    hang = tmp_path / "hang"
    hang.write_text("#!/bin/sh\necho '10 => Processing triangulated mesh'\nexec sleep 300\n")
    hang.chmod(0o755)
    model = str(cube_stl(tmp_path / "c.stl"))
    crashed = SliceRun(slicers.Slicer("prusaslicer", "PrusaSlicer", (), "prusa-slicer", ".ini", True, str(crash)),
                       model, None, profile(), str(tmp_path / "a.gcode")).run()
    assert crashed.status == "failed" and "signal 11" in crashed.reason and "something broke" in crashed.reason
    hung = SliceRun(slicers.Slicer("prusaslicer", "PrusaSlicer", (), "prusa-slicer", ".ini", True, str(hang)),
                    model, None, profile(), str(tmp_path / "b.gcode"), timeout=1.0).run()
    assert hung.status == "failed" and "did not finish within 1 s" in hung.reason
