"""mlx_lora: LoRA fine-tuning of chat LLMs on Apple MLX, with verified export to GGUF and Ollama."""

from mlx_lora.core.errors import MlxLoraError

__version__ = "0.1.0"
__all__ = ["MlxLoraError", "__version__"]
