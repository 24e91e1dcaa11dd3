"""Benchmarks: `python -m bench.run` measures the chatbot against its baselines and writes
docs/benchmarks.md.

- `run`: the orchestrator (scenarios, searches, the report); `loadgen`: the load generator, a
  process of its own; `procs`: server processes and their CPU/memory from /proc; `report`:
  statistics, targets and the markdown; `profile`: py-spy under load, summarised.
- `flask_app`: the pre-migration Flask app, the baseline; `fastapi_peer`: the same relay written
  the obvious way on FastAPI, the peer.
"""
