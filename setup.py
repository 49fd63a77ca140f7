"""aimv2: a kernel-optimized training core for AIMv2 vision encoders.

`kernels/` is installed as the standalone package `aimv2.kernels`; `aimv2/` holds the model, data,
training, evaluation and CLI.
"""
from setuptools import find_packages, setup

_pkgs = find_packages(include=["aimv2", "aimv2.*"])
_kernel_pkgs = ["aimv2.kernels"] + [
    "aimv2.kernels." + p for p in find_packages(where="kernels")
]

setup(
    name="aimv2",
    version="0.1.0",
    description="Kernel-optimized training core for AIMv2 vision encoders (Triton, DALI, torch.compile)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=_pkgs + _kernel_pkgs,
    package_dir={"aimv2.kernels": "kernels"},
    install_requires=[
        "torch>=2.11",
        "triton>=3.6; platform_system == 'Linux'",
        "numpy",
        "safetensors",
        "pillow",
        "simplejpeg",  # strict JPEG scan check (aimv2/data/dataset.py: jpeg_intact)
        "pyyaml",
        "tqdm",
        "matplotlib",
    ],
    extras_require={
        "test": ["pytest", "pytest-timeout", "hypothesis", "pytest-benchmark", "transformers>=4.57"],
        "dali": ["nvidia-dali-cuda120; platform_system == 'Linux'"],
        "dali-cu13": ["nvidia-dali-cuda130; platform_system == 'Linux'"],
        "bench": ["pytest-benchmark", "matplotlib", "webdataset"],  # webdataset: a peer in benchmarks/bench_data.py
        "tokenizers": ["tokenizers", "sentencepiece"],
        # float8 training (run.float8, aimv2/train/float8.py); the same pin as benchmarks/gpu_wheels.txt
        "fp8": ["torchao==0.17.0"],
    },
    entry_points={"console_scripts": ["aimv2 = aimv2.cli:main"]},
)
