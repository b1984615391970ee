"""`uvicorn server:app` entry point: the OpenAI-compatible server configured from MINISERVE_* env vars.

The model loads in the app's lifespan (on startup), not at import. See miniserve/server/app.py.
"""

from miniserve.server.app import create_app, settings_from_env

app = create_app(settings_from_env())
