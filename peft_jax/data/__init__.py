"""Datasets (by name or path), fixed-shape batching with exact resume, and probe baselines.

Example:
    >>> from peft_jax import data
    >>> data.known_datasets()
    ['fine-foods']
"""

from peft_jax.data.batching import DataPosition, ShuffledBatches, eval_batches, tokenize_examples
from peft_jax.data.dataset import Example, TextClassificationData
from peft_jax.data.fine_foods import load_fine_foods
from peft_jax.data.probe import encode_features, linear_probe_accuracy, majority_accuracy
from peft_jax.data.registry import DATASETS, known_datasets, load_dataset
from peft_jax.data.tables import load_table

__all__ = [
    "DATASETS",
    "DataPosition",
    "Example",
    "ShuffledBatches",
    "TextClassificationData",
    "encode_features",
    "eval_batches",
    "known_datasets",
    "linear_probe_accuracy",
    "load_dataset",
    "load_fine_foods",
    "load_table",
    "majority_accuracy",
    "tokenize_examples",
]
