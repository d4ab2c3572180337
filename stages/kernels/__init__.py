"""Low-bit linear kernels for the benchmark's torch backend.

* `gptq_unpack`: read GPTQ tensors (qweight / qzeros / scales / g_idx) back into integer codes.
* `int4`: PyTorch's own int4 weight-only kernel (`torch.ops.aten._weight_int4pack_mm`, "tinygemm").
* `int8`: PyTorch's int8 weight-only kernel (`torch.ops.aten._weight_int8pack_mm`, per channel).
* `triton_gemm`: a Triton dequantize-in-tile GEMM/GEMV for 2, 3, 4 and 8 bits on GPTQ-layout weights.
* `linear`: kernel-backed Linear modules and the batch-aware dispatch between kernels.

Nothing is imported here eagerly: Triton is optional and only needed on CUDA.
"""
