"""protoc output for serving/proto/jaxengine/v1/engine.proto; regenerate with `python -m serving.generate_stubs`."""
