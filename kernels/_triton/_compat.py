"""Interpreter compatibility shim (CPU runs under TRITON_INTERPRET=1 only).

Triton <= 3.6's interpreter holds every scalar as a 1-element array and turns a loop bound into an int with
int(array), which numpy >= 2.4 rejects ("only 0-dimensional arrays can be converted to Python scalars"), so any
`for i in range(runtime_value)` fails. Upstream fixed it (triton-lang/triton issue 9171, PR 9172) by reading the
single element explicitly; `apply()` installs the same conversion when, and only when, this numpy needs it.
Compiled (GPU) kernels never reach this code.
"""

from __future__ import annotations

import numpy as np

_applied = False


def _numpy_rejects_1elem_int() -> bool:
    try:
        int(np.ones(1, dtype=np.int32))
    except TypeError:
        return True
    return False


def apply() -> None:
    """Patch triton.runtime.interpreter once, if numpy needs it; a no-op otherwise."""
    global _applied
    if _applied or not _numpy_rejects_1elem_int():
        return
    from triton.runtime import interpreter

    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None:  # a triton whose interpreter is organised differently: nothing we know how to fix
        return

    def _patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(-1)[0]))

    interpreter._patch_lang_tensor = _patch_lang_tensor
    _applied = True
