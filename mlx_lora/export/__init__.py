"""Fuse, then write the GGUF(s) or MLX folder, the Modelfile and the manifest; verify; ollama
create."""
