"""What a model is: where it comes from (path, hub, GGUF), its chat template and metadata, loading,
LoRA."""
