"""The OpenAI-compatible HTTP server: protocol models, FastAPI app, command line."""
