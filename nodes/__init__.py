"""What runs on one machine, in four rooms (each imports only the rooms before it):

- `models/`: what a model is and how one gets here: specs (`specs.py`), the packaged defaults (`packaged.py`),
  loading (`loader.py`), memory estimates (`memory.py`), the build cache (`cache.py`), versions and manifests
  (`catalog.py`), pulling files from peers (`transfer.py`), the machine's accelerators (`hardware.py`), and the
  engines that run them (`backends/`: synthetic, onnxruntime chat and its build, onnxruntime embeddings,
  transformers chat).
- `api/`: the OpenAI-compatible HTTP gateway (`gateway.py`, `routes.py`, `bodies.py`, `answers.py`,
  `structured_output.py`), its guard against hostile callers (`guard.py`), metrics and the web console.
- `runtime/`: the node process: `node.py` wires everything and leaves gracefully, `executor.py` queues, batches and
  runs requests on the models, `admin.py` carries out operators' commands (load, switch, unload, pull), plus
  configuration, the memory budget, systemd and logging.
- `cli/`: the `lanmesh` command (`main.py`), the terminal console (status, chat, doctor) and the model commands.
"""
