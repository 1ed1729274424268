"""Build glue: the Cython parser is listed as a .pyx so `pip install .` compiles it from an sdist too."""

import sys

from setuptools import Extension, setup
from Cython.Build import cythonize

extensions = [
    Extension(
        "zevents._parser._cparser",
        ["zevents/_parser/_cparser.pyx"],
        # no fused multiply-add: the parser's float results must equal its pure-Python twin's, bit for bit
        extra_compile_args=["-O2"] + ([] if sys.platform == "win32" else ["-ffp-contract=off"]),
    )
]

setup(
    ext_modules=cythonize(
        extensions,
        language_level=3,
        compiler_directives={"boundscheck": False, "wraparound": False, "cdivision": True},
        quiet=True,
    ),
)
