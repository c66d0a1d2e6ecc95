"""Warnings from megatron-core and torch internals that a replay-megatron user cannot act on, silenced
in every process we start (the CLI and spawned ranks), so real warnings stay visible:

- megatron-core without Transformer Engine / Apex falls back to its local torch kernels and norms: the
  intended path on CPU and NPU, announced by several multi-line warnings per rank and import;
- megatron-core 0.16's TransformerConfig warns that its own default cuda_graph_scope is deprecated;
- megatron's torch_dist checkpoint strategy calls torch.distributed.checkpoint APIs that torch marks as
  deprecated (`load_state_dict`, ShardedTensor), once per checkpoint load.
"""
from __future__ import annotations

import os
import re
import warnings

# Literal starts of the messages (the form both `warnings.filterwarnings` and PYTHONWARNINGS take).
_MESSAGES = (
    "Transformer Engine and Apex are not installed",
    "Apex is not installed. Falling back to Torch Norm",
    "full scope is deprecated",
    "`load_state_dict` is deprecated",
    "Please use DTensor instead and we are deprecating ShardedTensor",
)


def silence_dependency_warnings() -> None:
    """Install ignore filters for exactly the messages listed in the module doc (this process)."""
    for message in _MESSAGES:
        warnings.filterwarnings("ignore", message=re.escape(message))


def pythonwarnings_for_children() -> str:
    """PYTHONWARNINGS for a child process: the same filters, active before it imports anything (a
    spawned rank imports megatron while unpickling its target, before our code runs), plus the parent's."""
    own = ",".join(f"ignore:{m}" for m in _MESSAGES)
    inherited = os.environ.get("PYTHONWARNINGS")
    return f"{inherited},{own}" if inherited else own
