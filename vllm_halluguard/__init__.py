"""Training-free hallucination mitigation for VLMs inside vLLM."""
