"""Models: what `--model` names, how a model is built, cached, pulled from peers and loaded, and the backends that
run it. Light to import: torch, transformers and onnxruntime load only inside the backends that need them."""
