"""Declares the optional C selection kernel; everything else lives in pyproject.toml.

The kernel is optional: if it cannot be compiled, tiny-knn falls back to its pure-PyTorch selection,
which gives identical results, more slowly.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "tiny_knn._select",
            sources=["src/tiny_knn/_select.c"],
            extra_compile_args=["-O3", "-std=c99", "-ffp-contract=off"],
            optional=True,
        )
    ]
)
