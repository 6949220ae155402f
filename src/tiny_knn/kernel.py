"""The compiled kernels (`_kernels/*.c`, built as the extension `_select`), loaded through ctypes, which releases
the GIL during each call.

Optional: if the extension was not built, was built from older source (a function is missing, or its panel sizes
differ from PANELS), or TINY_KNN_NO_KERNEL is set, `KERNEL` is None. The CPU then selects with torch.topk on
torch.mm's products: exact to float32 rounding, but neither as fast nor with tiny-knn's one exact score (see
_kernels/tk.h), so its last bits may differ from the kernel's.
"""

from __future__ import annotations

import ctypes
import os
from typing import Any

# The packed products' panels: query rows and doc rows per micro-kernel call (TK_MR, TK_NR in _kernels/tk.h,
# checked against the built kernel's tk_panels at load).
PANELS = (8, 32)
# CPU features as the kernel reports them (tk_cpu).
HAS_AVX2_FMA, HAS_AVX512, HAS_AVX512BW, HAS_AVX512BF16 = 1, 2, 4, 8

_i32, _i64, _ptr = ctypes.c_int32, ctypes.c_int64, ctypes.c_void_p
# The selection state that a screen updates: thresholds, pools, capacity, fills, k; the excluded pairs' offsets
# and docs (NULL for none); and its non-finite flag
_SELECTION = [_ptr, _ptr, _i64, _ptr, _i64, _ptr, _ptr, _ptr]
SIGNATURES: dict[str, tuple[Any, list[Any]]] = {
    "tk_cpu": (_i32, []),
    "tk_panels": (None, [_ptr]),
    "tk_scan": (_i64, [_ptr, _i64, _i64, _i64, _i64, _ptr, _ptr, _i64, _ptr, _i64]),
    "tk_select_best": (None, [_ptr, _i64, _ptr, _i64, _i64]),
    "tk_decode": (None, [_ptr, _i64, _ptr, _ptr]),
    "tk_exact": (_i32, [_ptr, _i64, _ptr, _i64, _i64, _ptr, _i64, _i64, _ptr, _i32]),
    # form, squared; queries, their stride, rows; docs, their stride, cols; dim; out, its stride
    "tk_exact_tile": (_i32, [_i32, _i32, _ptr, _i64, _i64, _ptr, _i64, _i64, _i64, _ptr, _i64]),
    "tk_normalize": (None, [_ptr, _i64, _i64, _i64]),
    "tk_pack": (None, [_ptr, _i64, _i64, _i64, _i64, _ptr]),
    "tk_product": (_i32, [_ptr, _i64, _i64, _i64, _ptr, _i64, _i64, _ptr, _i64]),
    "tk_product_supported": (_i32, []),
    # rows, their stride, count, dim, flags, panel; packed, rounded, its stride; first, second, third
    "tk_prepare_rows": (None, [_ptr, _i64, _i64, _i64, _i32, _i64, _ptr, _ptr, _i64, _ptr, _ptr, _ptr]),
    "tk_round_bf16": (None, [_ptr, _i64, _i64, _i64, _ptr, _i64]),
    "tk_screen_supported": (_i32, []),
    # estimator, metric; packed queries, packed docs; query factors (3), float32 queries, their stride; dim,
    # row_lo, rows, real_rows; doc factors (3), float32 docs; their stride, doc_count, real_docs, first_doc;
    # thresholds, pools, capacity, fills, k, excluded offsets, excluded docs, non_finite
    "tk_screen_scan": (
        _i64,
        [
            _i32,
            _i32,
            _ptr,
            _ptr,
            *[_ptr] * 4,
            *[_i64] * 5,
            *[_ptr] * 4,
            *[_i64] * 4,
            *_SELECTION,
        ],
    ),
    "tk_estimate_bf16": (_i32, [_ptr, _i64, _i64, _i64, _ptr, _i64, _i64, _ptr, _i64]),
    # metric; estimates, their stride, rows, cols; query factors (3), doc factors (3); float32 queries, their
    # stride, float32 docs, their stride; dim, first_doc; thresholds, pools, capacity, fills, k, excluded offsets,
    # excluded docs, non_finite
    "tk_screen_tile": (
        _i64,
        [
            _i32,
            _ptr,
            _i64,
            _i64,
            _i64,
            *[_ptr] * 6,
            _ptr,
            _i64,
            _ptr,
            _i64,
            _i64,
            _i64,
            *_SELECTION,
        ],
    ),
}


def _load() -> ctypes.CDLL | None:
    if os.environ.get("TINY_KNN_NO_KERNEL"):
        return None
    try:
        from . import _select  # type: ignore[attr-defined]
    except ImportError:
        return None
    lib = ctypes.CDLL(_select.__file__)
    for name, (result, arguments) in SIGNATURES.items():
        function = getattr(lib, name, None)
        if function is None:  # built from an older source (an editable install not rebuilt): not used
            return None
        function.restype, function.argtypes = result, arguments
    panels = (ctypes.c_int32 * 2)()
    lib.tk_panels(panels)
    return lib if tuple(panels) == PANELS else None


KERNEL = _load()
CPU_FEATURES = int(KERNEL.tk_cpu()) if KERNEL is not None else 0


def kernel_available() -> bool:
    """True when the compiled kernels were built and loaded."""
    return KERNEL is not None
