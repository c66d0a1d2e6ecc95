"""replay-megatron: Logits Replay + MoClip post-training on megatron-core."""

__version__ = "0.1.0"
