"""The GPTModel's output layer with an optional head.

Given a head, the layer hands it its input (the final hidden states [s, b, H]) and its weight shard
[V/TP, H] (on a tied last stage, the embedding copy megatron passes in) and returns what the head
computes in place of [s, b, V/TP] logits. Stage 1's restricted cross entropy runs this way inside
megatron's own forward, so tied/untied weights, the pipeline's tied copy and DDP all stay megatron's.
Without a head the layer is megatron's ColumnParallelLinear, unchanged.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
from megatron.core.tensor_parallel import ColumnParallelLinear

Head = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class OutputLayer(ColumnParallelLinear):
    """megatron's output layer; inside `computing(head)` its forward returns (head(hidden, weight), None)."""

    head: Head | None = None

    def forward(self, input_: torch.Tensor, weight: torch.Tensor | None = None, runtime_gather_output=None):
        if self.head is None:
            return super().forward(input_, weight=weight, runtime_gather_output=runtime_gather_output)
        return self.head(input_, self.weight if weight is None else weight), None

    @contextlib.contextmanager
    def computing(self, head: Head) -> Iterator[None]:
        self.head = head
        try:
            yield
        finally:
            self.head = None


def enable_output_heads(model: torch.nn.Module) -> None:
    """Make the last stage's output layer an OutputLayer: the same object, parameters and checkpoint keys
    (only its class changes, so construction, initialisation and RNG use stay megatron's)."""
    layer = getattr(model, "output_layer", None)
    if type(layer) is ColumnParallelLinear:
        layer.__class__ = OutputLayer


def output_layer_of(chunk: torch.nn.Module) -> tuple[OutputLayer | None, bool]:
    """(the OutputLayer of a model chunk, None off the last stage; whether a DDP wrapper overlaps its grad
    reduce, which needs a dense weight gradient to mark its bucket ready)."""
    module, overlap = chunk, False
    while not hasattr(module, "output_layer") and hasattr(module, "module"):
        overlap = overlap or bool(getattr(getattr(module, "ddp_config", None), "overlap_grad_reduce", False))
        module = module.module  # DDP / Float16Module wrappers
    layer = getattr(module, "output_layer", None)
    if layer is not None and not isinstance(layer, OutputLayer):
        raise TypeError(f"{type(module).__name__}.output_layer is a {type(layer).__name__}: build the model with "
                        "models.qwen3.build_model, which enables output heads")
    return layer, overlap
