"""Fused kernels for the gpt-oss expert path: clamped SwiGLU, the fused gate and combine passes of the grouped
expert forward, and MXFP4 dequantisation.

Each operation has one public entry point that runs a Triton kernel on CUDA tensors and a PyTorch
implementation of the same function elsewhere: ``swiglu.clamp_swiglu``, ``moe.gate_activation``,
``moe.combine_experts`` and ``mxfp4.dequantize_mxfp4_triton`` (whose specification is the PyTorch reference
``osstune.models.gpt_oss.mxfp4.dequantize_mxfp4``). Modules that define Triton kernels (``swiglu_triton``,
``moe_triton``, ``mxfp4``) import Triton; ``swiglu`` and ``moe`` do not.
"""
