"""Hermetic testbed: synthetic COCO-format scenes with co-occurrence bias and a tiny LLaVA trained on them."""
