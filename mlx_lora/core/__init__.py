"""Infrastructure every stage uses: errors, atomic files, safetensors access, the CLI wrapper."""
