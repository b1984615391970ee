"""The OpenAI-compatible HTTP server: app factory, routes, protocol, responses, tool calls, the engine process."""
