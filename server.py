"""`uvicorn server:app` entry point: the OpenAI-compatible server configured from MINISERVE_* env vars.

The model loads in the app's lifespan (on startup), not at import. See miniserve/server/app.py.
"""

import sys

from miniserve.server.app import connection_protocol, connection_variables, create_app, settings_from_env

try:
    config, server = settings_from_env()
except (ValueError, FileNotFoundError) as e:  # a bad MINISERVE_* value or model directory: one line
    sys.exit(f"miniserve: error: {e}")
app = create_app(config, server)
app.state.connection_variables = connection_variables()  # a warning if uvicorn runs without `http` below
# `uvicorn server:app --http server:http`: the protocol that enforces the header, body and keep-alive timeouts
# and the connection limit (MINISERVE_HEADER_TIMEOUT, ...); without it uvicorn has none of these but keep-alive.
http = connection_protocol(server)
