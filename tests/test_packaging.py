"""Users install from an sdist: it must carry the .pyx, compile it, and install only the `zevents` package."""
from __future__ import annotations

import subprocess
import sys
import tarfile
import zipfile

import pytest

from conftest import REPO


@pytest.fixture(scope="module")
def sdist(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    result = subprocess.run([sys.executable, "-m", "build", "--sdist", "--outdir", str(out), str(REPO)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    (path,) = out.glob("zevents-*.tar.gz")
    return path


def test_sdist_carries_sources_not_build_products(sdist):
    names = tarfile.open(sdist).getnames()
    assert any(n.endswith("zevents/_parser/_cparser.pyx") for n in names)
    assert any(n.endswith("zevents/_speedups.pyx") for n in names)
    assert any(n.endswith("zevents/_parser/_pyparser.py") for n in names)
    assert any(n.endswith("zevents/data/default.yaml") for n in names)
    assert not any(n.endswith((".so", ".pyc", "_cparser.c", "_speedups.c")) for n in names)


@pytest.mark.timeout(900)
def test_install_from_sdist_compiles_the_extensions(sdist, tmp_path):
    venv = tmp_path / "venv"
    # System site packages give the runtime dependencies without downloading them again; the build itself runs
    # in pip's isolated environment (setuptools + Cython from the build requirements), as for any user.
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    python = venv / "bin" / "python"
    wheels = tmp_path / "wheels"
    result = subprocess.run([str(python), "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(sdist)],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    (wheel,) = wheels.glob("zevents-*.whl")
    top_level = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert {name for name in top_level if not name.endswith(".dist-info")} == {"zevents"}
    result = subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "-q", str(wheel)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    probe = ("import zevents.parser as p, zevents, zevents.wire as w, os; "
             "print(p.IMPLEMENTATION, w.speedups is not None, os.path.dirname(zevents.__file__))")
    result = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, cwd=tmp_path,
                            env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    implementation, speedups, location = result.stdout.split()
    assert implementation == "c" and speedups == "True"
    assert location.startswith(str(venv)), "imported the source tree instead of the installed package"
    result = subprocess.run([str(venv / "bin" / "zevents"), "events", "--json"], capture_output=True, text=True,
                            cwd=tmp_path)
    assert result.returncode == 0 and '"PrintDone"' in result.stdout
