"""OpenAI-compatible HTTP API (chat and text completions) in front of the engine.

`serving.server.EngineServer` starts it (`http_server.HttpServer`) when
`ServeOptions.http_port` is set; the routes are in `app.py`. Nothing is imported here: an
engine process imports `engine_calls` to run its functions, and must not load FastAPI.
"""
