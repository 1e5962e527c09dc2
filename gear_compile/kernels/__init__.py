"""Kernels that read the compressed KV layout (`store`, `segment`) directly.

`cpu` + `cpu_attention.cpp` (+ `cpu_attention_kernel.h`, `cpu_simd*.h`):
attention over a store on the CPU (C++, built once per machine at first use,
one walk per instruction set picked at run time).
`decode_attention`: Triton flash-decoding of one query token per sequence
against a layer's compressed K and V (dequantization, low-rank and outlier
terms fused), for CUDA; its inner loops are in `decode_tiles`, its
host-side launch decisions (constexprs, splits, autotune configs) in
`decode_plan`.
Importing a Triton kernel module needs triton but not CUDA; on a machine
without a GPU run them under TRITON_INTERPRET=1 (set before importing
triton), for which this package patches one interpreter incompatibility with
NumPy >= 2.3.
Neighbours: `ops` (routes attention here), `store` / `segment` (the layout).
"""
import os


def _interpreter_index_compat() -> None:
    """Triton 3.6's interpreter turns a runtime int into a loop bound with
    int(array of shape (1,)), which NumPy >= 2.3 refuses; index its single
    element instead. Only under TRITON_INTERPRET=1 (CPU tests)."""
    from triton.runtime import interpreter
    original = interpreter._patch_lang_tensor
    if getattr(original, "gear_compat", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched.gear_compat = True
    interpreter._patch_lang_tensor = patched


if os.environ.get("TRITON_INTERPRET") == "1":
    _interpreter_index_compat()
