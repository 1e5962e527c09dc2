"""Triton kernels that read the compressed KV layout (`segment`) directly.

`decode_attention`: flash-decoding of one query token per sequence against a
layer's compressed K and V (dequantization, low-rank and outlier terms fused).
Importing a kernel module needs triton but not CUDA; on a machine without a GPU
run kernels under TRITON_INTERPRET=1. Neighbours: `ops` (routes decode
attention here on CUDA), `compressed_kv` / `segment` (the layout).
"""
