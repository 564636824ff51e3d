"""``python -m train`` is ``lora-one-train``."""

from train.cli import main

main()
