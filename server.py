"""`uvicorn server:app` entry point: the OpenAI-compatible server configured from MINISERVE_* env vars.

The model loads in the app's lifespan (on startup), not at import. See miniserve/server/app.py.
"""

from miniserve.server.app import create_app, settings_from_env

settings = settings_from_env()
app = create_app(settings)
# `uvicorn server:app --http server:http`: the protocol that enforces the header, body and keep-alive timeouts
# and the connection limit (MINISERVE_HEADER_TIMEOUT, ...); without it uvicorn has none of these but keep-alive.
http = settings.connection_protocol()
