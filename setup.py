"""alignax: a JAX research framework for LLM alignment."""

from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "jax>=0.6.0",
    "flax>=0.12.0",
    "optax>=0.2.4",
    "orbax-checkpoint>=0.11.0",
    "chex>=0.1.89",
    "ml-collections>=1.0.0",
    "absl-py>=2.1.0",
    "tensorflow-datasets>=4.9.7",
    "grain>=0.2.10",
    "array-record>=0.7.1",
    "importlib_resources>=6.0",
    "tqdm>=4.66",
    "tensorboardX>=2.6.2",
    "numpy>=1.26",
    "scipy>=1.11",  # Student t intervals of sweep summaries (jax needs it too)
    "pyarrow>=15.0",
    "matplotlib>=3.8",
    "sentencepiece>=0.2.0",
    "flask>=3.0",
    "safetensors>=0.4",  # LoRA adapters in exports (export/lora/adapters.safetensors)
    # A checkpoint's own Jinja chat template (data.chat_template="model"), rendered in jinja's
    # sandbox; 3.1.6 closes its known sandbox escapes.
    "jinja2>=3.1.6",
    "PyYAML>=6.0",  # constitution files (alignax/cai/constitution.py)
]

# Hugging Face checkpoint import/export and tokenizer.json (install torch's CPU build for the tests).
HF_REQUIRES = [
    "safetensors>=0.4",
    "tokenizers>=0.19",
]

TEST_REQUIRES = [
    "pytest>=8.0",
    "pytest-xdist>=3.5",
    "nbformat>=5.10",
    "nbclient>=0.10",
    "ipykernel>=6.29",
    "transformers>=4.45",
    "peft>=0.13",  # tests/test_peft.py: adapters checked against PeftModel
    "selenium>=4.20",
] + HF_REQUIRES

setup(
    name="alignax",
    version="0.1.0",
    description="A JAX research framework for LLM alignment: pretraining, SFT, reward modeling, PPO, DPO.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["alignax", "alignax.*"]),
    package_data={"alignax": ["py.typed", "studio/templates/*.html", "studio/static/*",
                              "cai/constitutions/*.yaml"]},
    install_requires=INSTALL_REQUIRES,
    extras_require={"hf": HF_REQUIRES, "test": TEST_REQUIRES},
    entry_points={"console_scripts": ["alignax=alignax.cli:main"]},
)
