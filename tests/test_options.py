"""Options every command shares: one --device rule, one name for the engine's batch, memory sizes."""

import argparse

import pytest
import torch

from codellm.errors import UserError
from codellm.eval import cli as eval_cli
from codellm.options import add_model_options, parse_size, resolve_device


def test_one_device_rule_for_every_command():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto") == resolve_device(None) == expected and resolve_device("cpu") == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="--device cuda:1: no CUDA device"):
            resolve_device("cuda:1")
    parser = argparse.ArgumentParser()
    add_model_options(parser)
    assert parser.parse_args([]).device == "auto"


def test_eval_names_the_engine_batch_as_serve_does():
    parser = argparse.ArgumentParser()
    eval_cli.add_parser(parser.add_subparsers())
    assert parser.parse_args(["eval", "humaneval", "--max-batch", "8"]).batch_size == 8
    assert parser.parse_args(["eval", "humaneval", "--batch-size", "4"]).batch_size == 4  # the older name


def test_parse_size():
    assert parse_size("512M") == 512 << 20 and parse_size("1.5GiB") == 3 << 29 and parse_size("100") == 100
    with pytest.raises(UserError, match="memory size"):
        parse_size("lots")
