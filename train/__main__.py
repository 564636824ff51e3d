"""``python -m lora_one_train`` is ``lora-one-train``."""

from lora_one_train.cli import main

main()
