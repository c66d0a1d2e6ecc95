"""replay-megatron: Logits Replay + MoClip post-training of Qwen3 on megatron-core (Ascend 910B, CUDA, CPU)."""
from setuptools import find_packages, setup

setup(
    name="replay-megatron",
    version="0.1.0",
    description="Logits Replay + MoClip (arXiv 2510.09152) on megatron-core for Ascend 910B, CUDA and CPU",
    python_requires=">=3.10",
    packages=find_packages(include=["replay_megatron", "replay_megatron.*"]) + ["replay_megatron_kernels"],
    # kernels/ installs as `replay_megatron_kernels`: PyPI's unrelated `kernels` package owns that name.
    package_dir={"replay_megatron_kernels": "kernels"},
    package_data={"replay_megatron": ["py.typed"]},
    install_requires=[
        # 2.13.0 is the CPU wheel this project's CI machine has on disk; a bare `torch` would pull CUDA.
        "torch>=2.6,<=2.13.0",
        "megatron-core>=0.12.0,<=0.16.1",
        # megatron-core 0.12's dist_checkpointing (torch_dist strategy) imports psutil without declaring it.
        "psutil>=5.9",
        "transformers>=4.51",
        "numpy>=1.24",
        "sentencepiece>=0.2",
        "protobuf>=3.20",  # reads a sentencepiece model's settings when it is exported as an HF tokenizer
        "pyyaml>=6.0",
        "safetensors>=0.4",
        "pydantic>=2.5",
        "tqdm>=4.60",
        "matplotlib>=3.7",
    ],
    extras_require={
        "npu": ["torch_npu"],
        "triton": ["triton>=3.0"],
        "tensorboard": ["tensorboard>=2.12"],
        # lm-evaluation-harness with its Hugging Face model backend (eval.lm_eval)
        "eval": ["lm-eval[hf]>=0.4.9"],
        # Parquet inputs to `preprocess` (pyarrow alone: `datasets` would add pandas, fsspec, the hub client)
        "parquet": ["pyarrow>=14"],
        # megatron-core's Muon (AdaMuon, MuonClip); on Python < 3.12 see README: Muon baselines
        "muon": ['emerging-optimizers>=0.2; python_version >= "3.12"', "absl-py>=1.0"],
        "test": ["pytest>=7.4", "pytest-xdist>=3.3", "hypothesis>=6.90", "triton>=3.0", "tensorboard>=2.12",
                 "lm-eval[hf]>=0.4.9", "pyarrow>=14", 'emerging-optimizers>=0.2; python_version >= "3.12"',
                 "absl-py>=1.0"],
    },
    entry_points={"console_scripts": ["replay-megatron=replay_megatron.cli.main:main"]},
)
