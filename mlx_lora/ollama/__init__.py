"""Ollama: the Modelfile, the Go TEMPLATE derived from the chat template, Go's engine run for
real."""
