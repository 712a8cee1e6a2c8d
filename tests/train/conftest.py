"""Fixtures for the training tests: a tiny HF-layout BERT directory and a synthetic dataset."""

import pytest

from train import tiny


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return tiny.write_model(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory):
    return tiny.write_data(tmp_path_factory.mktemp("tiny-data"))
