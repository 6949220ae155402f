"""What this machine can run, for tests to skip visibly where it cannot, and to fail instead where the environment
says it must: TINY_KNN_REQUIRE=screen,kernel,triton (a comma-separated list of estimators, "kernel" for the
compiled kernel and "triton" for Triton; "all" for every one), as TINY_KNN_REQUIRE_CUDA=1 does for CUDA. A CI on
a machine that should have them cannot then pass by skipping."""

from __future__ import annotations

import os

import pytest

from tiny_knn import estimators, gpu_survivors
from tiny_knn.kernel import kernel_available


def required(name: str) -> bool:
    wanted = {part.strip() for part in os.environ.get("TINY_KNN_REQUIRE", "").split(",") if part.strip()}
    return name in wanted or "all" in wanted


def needs(name: str) -> pytest.MarkDecorator:
    """Skip unless estimator `name` runs here (or TINY_KNN_REQUIRE names it: then the test runs, and fails)."""
    runs = name in estimators.available()
    return pytest.mark.skipif(
        not runs and not required(name),
        reason=f"the {name} estimator does not run on this CPU (set TINY_KNN_REQUIRE={name} to make this a failure)",
    )


needs_kernel = pytest.mark.skipif(
    not kernel_available() and not required("kernel"),
    reason="tiny-knn's compiled kernel is not built (set TINY_KNN_REQUIRE=kernel to make this a failure)",
)

needs_triton = pytest.mark.skipif(
    not gpu_survivors.available() and not required("triton"),
    reason="Triton is not installed (the test extra installs it) or TINY_KNN_NO_TRITON is set "
    "(set TINY_KNN_REQUIRE=triton to make this a failure)",
)
