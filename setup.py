from setuptools import find_packages, setup

setup(
    name="adaskip",
    version="0.1.0",
    description="AdaSkip training-free sublayer skipping as an engine toolchain (calibrate, build, run)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=find_packages(include=["adaskip", "adaskip.*"]),
    install_requires=[
        # 2.6 fixes CVE-2025-32434 (code execution through torch.load(weights_only=True), which loads .bin checkpoints);
        # install the CPU wheel first (README): a bare requirement would pull a CUDA build
        "torch>=2.6",
        "transformers>=5.0,<6",
        "tokenizers",
        "safetensors",
        "gguf>=0.10",
        "accelerate",
        "huggingface_hub",
        "jsonschema>=4",
        "onnx>=1.16",
        "onnxruntime>=1.20",
        "onnx_ir",  # onnxruntime's MatMulNBits quantizer imports it
        "polygraphy",
        "numpy",
        "tqdm",
        "matplotlib",
    ],
    extras_require={
        "tensorrt": ["tensorrt-rtx-cu13-libs==1.7.1.116", "tensorrt-rtx-cu13-bindings==1.7.1.116"],  # builds engines CPU-only
        "triton": ["nvidia-pytriton==0.7.0", "tritonclient[http,grpc]==2.73.0"],
        "eval": ["rouge-score", "scipy>=1.15"],  # scipy: intervals and paired tests (adaskip/eval/stats.py)
        "bench": ["onnxruntime-genai"],
        # llama.cpp anchor columns of adaskip-bench: a source distribution, pip compiles llama.cpp (10-15 min on 2 cores)
        "llamacpp": ["llama-cpp-python>=0.3.36", "sentencepiece"],  # llama.cpp's converter imports sentencepiece
        "serve": ["fastapi>=0.110", "uvicorn>=0.29", "pydantic>=2.6", "prometheus_client>=0.20"],
        "test": [
            "pytest>=8", "hypothesis>=6",
            "fastapi>=0.110", "uvicorn>=0.29", "pydantic>=2.6", "prometheus_client>=0.20", "openai>=1.30",
            "tensorrt-rtx-cu13-libs==1.7.1.116", "tensorrt-rtx-cu13-bindings==1.7.1.116",
            "nvidia-pytriton==0.7.0", "tritonclient[http,grpc]==2.73.0",
            "rouge-score", "scipy>=1.15",
        ],
    },
    entry_points={"console_scripts": [
        "adaskip-build=adaskip.cli.build:main",
        "adaskip-run=adaskip.cli.run:main",
        "adaskip-verify=adaskip.cli.verify:main",
        "adaskip-bench=adaskip.cli.bench:main",
        "adaskip-eval=adaskip.cli.eval:main",
        "adaskip-eval-summary=adaskip.cli.eval_summary:main",
        "adaskip-deploy=adaskip.cli.deploy:main",
        "adaskip-serve=adaskip.cli.serve:main",
    ]},
)
