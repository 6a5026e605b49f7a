"""The one compiled part of enginehouse: the SIGBUS guard that lets system shared-memory
regions be mapped (src/enginehouse/core/mapping_guard.py says why). It is optional: where
no C compiler is found the install goes on, and regions are read through their descriptors.
Everything else is in pyproject.toml."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "enginehouse.core._mapping_guard",
            sources=["src/enginehouse/core/_mapping_guard.c"],
            extra_compile_args=["-O2", "-std=c11"],
            optional=True,
        )
    ]
)
