"""Declares the optional C selection kernel; everything else lives in pyproject.toml.

The kernel is optional: if it cannot be compiled, tiny-knn falls back to its pure-PyTorch selection,
which gives identical results, more slowly.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "tiny_knn._select",
            sources=[f"src/tiny_knn/_kernels/{name}.c" for name in ("select", "exact", "product", "screen")],
            depends=["src/tiny_knn/_kernels/tk.h"],
            include_dirs=["src/tiny_knn/_kernels"],
            # Exact scores are defined operation by operation: no contraction into FMAs the source does not write
            extra_compile_args=["-O3", "-std=c99", "-ffp-contract=off"],
            optional=True,
        )
    ]
)
