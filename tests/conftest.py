"""Fixtures shared across test modules (pytest finds them here by name)."""
import pytest

from replay_megatron.ops.restricted_cross_entropy import TorchCandidates


@pytest.fixture(params=["sparse", "gather"])
def torch_path(request, monkeypatch):
    """Both PyTorch paths on CPU fp32: sparse products (the default) and the chunked gather (the fallback)."""
    if request.param == "gather":
        monkeypatch.setattr(TorchCandidates, "_sparse_ok", staticmethod(lambda weight: False))
    return request.param
