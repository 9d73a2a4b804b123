"""Generation and its front ends: the one generation function, the chat CLI, the OpenAI server."""
