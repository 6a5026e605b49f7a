"""The compiled parts of enginehouse, both optional: where no C compiler is found the
install goes on without them.

- The SIGBUS guard that lets system shared-memory regions be mapped
  (src/enginehouse/core/mapping_guard.py says why); without it regions are read through
  their descriptors.
- The host-staging copies (src/enginehouse/backends/_staging.c): large inputs copied into
  GPU engines' page-locked buffers with streaming stores, and FP32 inputs of fp16 engines
  converted to FP16 on the way (half the bytes); without it inputs are copied by NumPy and
  staged as FP32.

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
            "enginehouse.backends._staging",
            sources=["src/enginehouse/backends/_staging.c"],
            extra_compile_args=["-O2", "-std=c11"],
            optional=True,
        ),
    ]
)
