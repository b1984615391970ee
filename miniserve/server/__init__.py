"""The OpenAI-compatible HTTP server: app factory, routes, protocol, response formatting, the engine thread."""
