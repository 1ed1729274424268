"""Build glue: the Cython modules are listed as .pyx so `pip install .` compiles them from an sdist too."""

import sys

from setuptools import Extension, setup
from Cython.Build import cythonize

extensions = [
    Extension(
        "zevents._parser._cparser",
        ["zevents/_parser/_cparser.pyx"],
        # no fused multiply-add: the parser's float results must equal its pure-Python twin's, bit for bit
        extra_compile_args=["-O2"] + ([] if sys.platform == "win32" else ["-ffp-contract=off"]),
    ),
    # The metadata analyser's core (twin of zevents/files/analysis_core.py): no fused multiply-add either, so that
    # its time estimate equals the twin's bit for bit
    Extension(
        "zevents.files.analysis_ccore",
        ["zevents/files/analysis_ccore.pyx"],
        extra_compile_args=["-O2"] + ([] if sys.platform == "win32" else ["-ffp-contract=off"]),
    ),
    # The bus's hot paths (payload validation, the broker's ingest loop); twins of wire.py and broker.py.
    # zlib: the journal's crc32 (the library Python's own zlib module links; zlib1g-dev to build).
    Extension("zevents._speedups", ["zevents/_speedups.pyx"], extra_compile_args=["-O2"], libraries=["z"]),
]

setup(
    ext_modules=cythonize(
        extensions,
        language_level=3,
        compiler_directives={"boundscheck": False, "wraparound": False, "cdivision": True},
        quiet=True,
    ),
)
