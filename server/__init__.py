"""OpenAI-compatible front end."""
