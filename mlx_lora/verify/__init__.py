"""Proof at every hop: the export manifest, read-back, tokenization, logits, Modelfile prompts."""
