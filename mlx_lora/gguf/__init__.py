"""The GGUF format: writing models and adapters, the vocabulary, quantization, llama.cpp as
referee."""
