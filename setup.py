"""The compiled parts of enginehouse, both optional: where no C compiler is found the
install goes on without them.

- The SIGBUS guard that lets system shared-memory regions be mapped
  (src/enginehouse/core/mapping_guard.py says why); without it regions are read through
  their descriptors.
- The FP32 to FP16 conversion that stages fp16 GPU engines' inputs in half the bytes
  (src/enginehouse/backends/_half.c); without it they are staged as FP32.

Everything else is in pyproject.toml."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "enginehouse.core._mapping_guard",
            sources=["src/enginehouse/core/_mapping_guard.c"],
            extra_compile_args=["-O2", "-std=c11"],
            optional=True,
        ),
        Extension(
            "enginehouse.backends._half",
            sources=["src/enginehouse/backends/_half.c"],
            extra_compile_args=["-O2", "-std=c11"],
            optional=True,
        ),
    ]
)
