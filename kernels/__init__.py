"""Triton kernels of replay-megatron (installed as `replay_megatron_kernels`).

Each kernel has a PyTorch reference (`restricted_ce`: `replay_megatron.ops`; `moclip`: the PyTorch paths
of `replay_megatron.optim.moclip`); on CPU the kernels run under TRITON_INTERPRET=1 in the tests.
Importing this package never requires triton.
"""
