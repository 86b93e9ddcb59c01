"""Fused kernels for the gpt-oss expert path: clamped SwiGLU and MXFP4 dequantisation.

Each operation has one public entry point that runs a Triton kernel on CUDA tensors and a PyTorch
implementation of the same function elsewhere: ``swiglu.clamp_swiglu`` and ``mxfp4.dequantize_mxfp4_triton``
(whose specification is the PyTorch reference ``osstune.models.gpt_oss.mxfp4.dequantize_mxfp4``).
Modules that define Triton kernels (``swiglu_triton``, ``mxfp4``) import Triton; ``swiglu`` does not.
"""
