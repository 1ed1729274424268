"""Users install from an sdist: it must carry the .pyx (compiled at install), its own tests with their data, and a
LICENSE; what it installs is the `zevents` package alone, and that installed package is what runs, even when a
node is started from inside the source tree.

Everything here happens in a fresh venv made from the base interpreter, without its site packages: the only
packages in it are the ones the wheel declares, installed from the index as a user's pip would (a base python3
with no packages is the newcomer's case, and it must pass there).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

import pytest

from conftest import REPO, wait_for


def run(argv, timeout=900, **kwargs):
    result = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=timeout, **kwargs)
    assert result.returncode == 0, f"{argv}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def sdist(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    run([sys.executable, "-m", "build", "--sdist", "--outdir", out, REPO])
    (path,) = out.glob("zevents-*.tar.gz")
    return path


@pytest.fixture(scope="module")
def installed(sdist, tmp_path_factory):
    """A venv with the wheel built from the sdist (and the test extras) installed; the sdist unpacked beside it."""
    base = Path(tmp_path_factory.mktemp("inst"))
    venv = base / "venv"
    # No --system-site-packages: a newcomer's base python3 has none of our dependencies (and must not need any).
    run([sys.executable, "-m", "venv", venv])
    python = venv / "bin" / "python"
    wheels = base / "wheels"
    run([python, "-m", "pip", "wheel", "--no-deps", "-q", "-w", wheels, sdist])
    (wheel,) = wheels.glob("zevents-*.whl")
    run([python, "-m", "pip", "install", "-q", f"zevents[test] @ {wheel.as_uri()}"])
    with tarfile.open(sdist) as archive:
        archive.extractall(base / "src", **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    (tree,) = (base / "src").iterdir()
    return {"venv": venv, "python": python, "wheel": wheel, "tree": tree}


def test_sdist_carries_sources_tests_and_licence_not_build_products(sdist):
    names = tarfile.open(sdist).getnames()
    for wanted in ("zevents/_parser/_cparser.pyx", "zevents/_speedups.pyx", "zevents/_parser/_pyparser.py",
                   "zevents/data/default.yaml", "LICENSE", "tests/conftest.py", "tests/test_parser.py",
                   "tests/data/parser/README.md", "tests/data/hooks/seed-example.yaml", "README.md"):
        assert any(n.endswith("/" + wanted) for n in names), f"{wanted} is not in the sdist"
    assert not any(n.endswith((".so", ".pyc", "_cparser.c", "_speedups.c")) for n in names)
    assert not any("node_modules" in n for n in names)
    pkg_info = tarfile.open(sdist).extractfile(next(n for n in names if n.endswith("/PKG-INFO"))).read().decode()
    assert "License-Expression: MIT" in pkg_info and "License-File: LICENSE" in pkg_info


@pytest.mark.timeout(1200)
def test_the_installed_package_is_compiled_and_alone(installed, tmp_path):
    top_level = {name.split("/")[0] for name in zipfile.ZipFile(installed["wheel"]).namelist()}
    assert {name for name in top_level if not name.endswith(".dist-info")} == {"zevents"}
    probe = ("import zevents.parser as p, zevents, zevents.wire as w, os; "
             "print(p.IMPLEMENTATION, w.speedups is not None, os.path.dirname(zevents.__file__))")
    result = run([installed["python"], "-c", probe], cwd=tmp_path, env={"PATH": "/usr/bin:/bin"})
    implementation, speedups, location = result.stdout.split()
    assert implementation == "c" and speedups == "True"
    assert location.startswith(str(installed["venv"])), "imported the source tree instead of the installed package"
    zevents = installed["venv"] / "bin" / "zevents"
    assert '"PrintDone"' in run([zevents, "events", "--json"], cwd=tmp_path).stdout
    assert run([zevents, "--version"], cwd=tmp_path).stdout.strip() == "zevents 0.1.0"


@pytest.mark.timeout(1200)
def test_the_sdist_runs_its_own_tests_against_the_installed_package(installed):
    """A subset, chosen to stay within a few minutes on a small machine: the parser (both twins: the compiled one
    must load, and the unpacked tree has no compiled module, so it is the installed one), the wire format, the
    catalogue, the config, README's YAML blocks.  The whole suite is what the checkout runs; here the point is
    that the sdist carries what its tests need (conftest, tests/data, README) and that they pass on what it
    installs.  `-P` keeps the unpacked tree off sys.path."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ZEVENTS_", "PYTHON"))}
    result = run([installed["python"], "-P", "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_parser.py",
                  "tests/test_wire.py", "tests/test_events.py", "tests/test_config.py", "tests/test_readme.py"],
                 cwd=installed["tree"], env=env)
    summary = result.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "failed" not in summary and "error" not in summary, result.stdout[-3000:]


def _mapped_zevents_files(pid: int) -> set:
    """The zevents extension modules a process has loaded (from /proc/PID/maps)."""
    try:
        maps = Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return set()
    return {line.split()[-1] for line in maps.splitlines() if "/zevents/" in line and line.endswith(".so")}


@pytest.mark.timeout(1200)
def test_a_node_started_from_the_source_tree_runs_the_installed_package(installed):
    """`python -m zevents run` from the unpacked sdist: the supervisor itself imports the tree (Python puts the
    working directory first), but every service must run the installed, compiled package."""
    home = Path(tempfile.mkdtemp(prefix="zevp-"))
    (home / "run").mkdir(mode=0o700)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(home), "XDG_RUNTIME_DIR": str(home / "run"), "PYTHONUNBUFFERED": "1"}
    log = open(home / "node.log", "w")
    node = subprocess.Popen([str(installed["python"]), "-m", "zevents", "run", "--quiet"], cwd=installed["tree"],
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        def services():
            assert node.poll() is None, (home / "node.log").read_text()
            try:  # the node is named after the host: the runtime directory holds only its folder
                (status_file,) = (home / "run" / "zevents").glob("*/node.json")
                status = json.loads(status_file.read_text())
            except (OSError, ValueError):
                return None
            return status["services"] if all(s["ready"] for s in status["services"]) else None

        started = wait_for(services, 120, 0.2, message="the node to start")
        site = str(installed["venv"])
        for service in started:
            loaded = wait_for(lambda: _mapped_zevents_files(service["pid"]), 30, 0.1,
                              message=f"{service['name']} to load the compiled modules")
            assert all(path.startswith(site) for path in loaded), (service["name"], loaded)
    finally:
        node.send_signal(signal.SIGTERM)
        try:
            node.wait(60)
        except subprocess.TimeoutExpired:
            node.kill()
            node.wait()
        log.close()
        shutil.rmtree(home, ignore_errors=True)
    assert node.returncode == 0
