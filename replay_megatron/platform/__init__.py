"""Platform layer: launch environment, device choice (NPU/CUDA/CPU), distributed and megatron init."""
