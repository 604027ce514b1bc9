"""Test setup: 8 simulated CPU devices (for mesh tests), float32 matmuls, wandb off."""

import os

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_default_matmul_precision", "float32")


def write_kjv_corpus(directory, documents: int):
    """directory/corpus.txt: the first `documents` books of the shipped KJV, blank-line
    separated (the tiny corpus of the end-to-end tests); returns directory."""
    from data.corpus import load_documents

    docs = load_documents("kjv")[:documents]
    (directory / "corpus.txt").write_text("\n\n".join(doc.text for doc in docs))
    return directory
