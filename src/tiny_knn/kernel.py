"""The compiled kernels (`_select.c`), loaded through ctypes, which releases the GIL during each call.

Optional: if the extension was not built, was built from an older source (a function is missing), or
TINY_KNN_NO_KERNEL is set, `KERNEL` is None and callers use their pure numpy/PyTorch fallbacks, which give
identical results, more slowly.
"""

from __future__ import annotations

import ctypes
import os


def _load() -> ctypes.CDLL | None:
    if os.environ.get("TINY_KNN_NO_KERNEL"):
        return None
    try:
        from . import _select  # type: ignore[attr-defined]
    except ImportError:
        return None
    lib = ctypes.CDLL(_select.__file__)
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    signatures = {
        "tk_scan": (i64, [ptr, i64, i64, i64, i64, ptr, ptr, i64, ptr, i64]),
        "tk_select_best": (None, [ptr, i64, ptr, i64, i64]),
        "tk_decode": (None, [ptr, i64, ptr, ptr]),
        "tk_exact": (ctypes.c_int32, [ptr, i64, ptr, i64, i64, ptr, i64, i64, ptr, ctypes.c_int32]),
        "tk_pack": (None, [ptr, i64, i64, i64, i64, ptr]),
        "tk_product": (ctypes.c_int32, [ptr, i64, i64, i64, ptr, i64, i64, ptr, i64]),
        "tk_product_supported": (ctypes.c_int32, []),
        "tk_cpu_is_amd": (ctypes.c_int32, []),
        "tk_product_scan": (i64, [ptr, i64, i64, i64, i64, ptr, i64, i64, i64, ptr, ptr, i64, ptr, i64, ptr]),
        "tk_pack_bf16": (None, [ptr, i64, i64, i64, i64, ctypes.c_int32, ptr, ptr, ptr]),
        "tk_screen_supported": (ctypes.c_int32, []),
        # tk_screen_scan: packed queries, their two factors, float32 rows; their stride, dim, row_lo, rows,
        # real_rows; packed docs, norms, residuals, float32 rows; their stride, doc_count, real_docs, first_doc;
        # thresholds, pools, capacity, fills, k, non_finite
        "tk_screen_scan": (i64, [ptr] * 4 + [i64] * 5 + [ptr] * 4 + [i64] * 4 + [ptr, ptr, i64, ptr, i64, ptr]),
        "tk_dot_tile": (ctypes.c_int32, [ptr, i64, i64, ptr, i64, i64, i64, ptr, i64]),
    }
    for name, (result, arguments) in signatures.items():
        function = getattr(lib, name, None)
        if function is None:  # built from an older _select.c (an editable install not rebuilt): not used
            return None
        function.restype, function.argtypes = result, arguments
    return lib


KERNEL = _load()


def kernel_available() -> bool:
    """True when the compiled kernels were built and loaded."""
    return KERNEL is not None
