"""The shipped run configs (YAML), package data of ``lora_one_train``: ``lora-one-train <name>``."""
