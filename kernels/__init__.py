"""Triton kernels of replay-megatron (installed as `replay_megatron_kernels`).

Each kernel has a PyTorch reference in `replay_megatron.ops`; on CPU the kernels run under
TRITON_INTERPRET=1 in the tests. Importing this package never requires triton.
"""
