"""``python -m lora_one_train`` is ``lora-one-train``."""

from lora_one_train.cli import main

if __name__ == "__main__":
    main()
