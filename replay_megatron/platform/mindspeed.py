"""MindSpeed's megatron adaptor on Ascend NPUs: `import mindspeed.megatron_adaptor` patches megatron-core with
MindSpeed's fused attention, RMSNorm, SwiGLU and RoPE kernels (what MindSpeed-LLM runs megatron with).

The import itself applies the patches, so it happens only when asked: `platform.mindspeed_adaptor: on`
(on any device; refused clearly when it does not import), or `auto` (the default) on an NPU where the
`mindspeed` package is installed. `off`, and `auto` on CPU or CUDA, never import it. Untested here (no NPU,
no MindSpeed); note that megatron-core is already imported by then (`mcore_compat`), while MindSpeed-LLM
imports the adaptor before megatron.
"""
from __future__ import annotations

import importlib
import importlib.util

MODES: tuple[str, ...] = ("auto", "on", "off")


class MindSpeedUnavailable(RuntimeError):
    """`platform.mindspeed_adaptor` asked for MindSpeed's adaptor and it did not import."""


def apply_mindspeed_adaptor(mode: str, device_type: str) -> bool:
    """Import `mindspeed.megatron_adaptor` as `mode` says for a process on `device_type`; returns whether
    it was applied. Call before the model is built (its patches replace megatron-core's modules)."""
    if mode not in MODES:
        raise ValueError(f"platform.mindspeed_adaptor={mode!r}; allowed: {', '.join(MODES)}")
    if mode == "off":
        return False
    if mode == "auto" and (device_type != "npu" or importlib.util.find_spec("mindspeed") is None):
        return False
    try:
        importlib.import_module("mindspeed.megatron_adaptor")
    except Exception as e:  # noqa: BLE001 - any failure here means the adaptor is not usable
        why = "set platform.mindspeed_adaptor: off to run without it" if mode == "auto" else \
            "install the MindSpeed that matches this megatron-core (core_r0.12.1 for 0.12.1), or set auto/off"
        raise MindSpeedUnavailable(f"platform.mindspeed_adaptor={mode}: mindspeed.megatron_adaptor does not "
                                   f"import ({type(e).__name__}: {e}); {why}") from e
    return True
