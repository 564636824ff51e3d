"""The main job (train/quickstart.py) runs end to end on a tiny model and a real task."""

import re

import pytest

from train import quickstart


@pytest.mark.slow  # real BoolQ data
def test_quickstart_runs_lora_one_end_to_end():
    results = quickstart.main(
        ["--model", "toy-llama", "--steps", "3", "--eval", "8", "--batch-size", "2", "--max-len", "64", "--rank", "2"]
    )
    assert set(results) == {"base model", "after lora-one"}
    for result in results.values():
        assert re.fullmatch(r"\d\.\d{3} \(\d/8\)", str(result))
