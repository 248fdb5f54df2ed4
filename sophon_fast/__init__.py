"""sophon_fast: SOPHON non-fine-tunable learning with fused Triton, C++ and CUDA kernels."""

__version__ = "0.1.0"
