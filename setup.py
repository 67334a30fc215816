"""Packaging for dpo_fast.

The Triton kernels live in the top-level folder ``kernels/`` but are installed as the
subpackage ``dpo_fast.kernels``: a top-level package named ``kernels`` would shadow the
Hugging Face ``kernels`` package that transformers probes for.
"""
from setuptools import setup

setup(
    name="dpo_fast",
    version="0.1.0",
    description="Fused Triton kernels for the hot path of DPO training: lm_head + log-softmax + "
    "label gather and the preference loss without materialising the logits.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["dpo_fast", "dpo_fast.kernels", "dpo_fast.integrations"],
    package_dir={"dpo_fast": "dpo_fast", "dpo_fast.kernels": "kernels"},
    install_requires=["torch>=2.4", "numpy"],
    extras_require={
        "triton": ["triton>=3.0"],
        "hf": ["transformers>=4.45", "safetensors", "tqdm"],
        "test": ["pytest", "pytest-benchmark", "ninja", "triton>=3.0", "transformers>=4.45",
                 "safetensors", "tqdm", "matplotlib", "pyarrow", "datasets", "peft", "trl==1.16.0",
                 "hypothesis"],
        "trl": ["trl>=1.15,<1.17"],
        "demo": ["transformers>=4.45", "safetensors", "tqdm", "matplotlib"],
        "peers": ["liger-kernel", "cut-cross-entropy"],
    },
    entry_points={"console_scripts": ["dpo-fast=dpo_fast.cli:main"]},
)
