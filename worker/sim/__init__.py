"""worker.sim: a vLLM-compatible inference simulator (no GPU, no model weights).

It speaks vLLM's OpenAI-compatible API (same shapes, SSE framing, errors and status codes) and
exports vLLM's Prometheus metrics, with timings from a small engine model: continuous batching
(--max-num-seqs), chunked prefill under a token budget, a prefix-cached paged KV cache with LRU
eviction, decode time growing with the batch, and LoRA slots with a load cost. It publishes vLLM's KV
cache events over ZMQ (--kv-events-config) and answers autoregressively, so a stream cut after k tokens
can be continued exactly (return_token_ids, continue_final_message). See README.md.

Command line: `python -m worker.sim --served-model-name NAME [...]` or `switchyard sim ...`
(`worker.sim.cli.main(argv) -> int`); `--count K --port-base P` runs K servers in one process.

Python API:
- `SimConfig` (worker.sim.config): every setting, validated (`ConfigError` names the bad one).
- `create_sim_app(config) -> SimApp` (worker.sim.server): a pure ASGI app for one server; its
  `state` holds the engine (`state.engine`), driver and metrics.
- `serve_sim(config)` (worker.sim.embedded): async context manager serving one simulator on a
  real loopback port inside the caller's event loop; yields `RunningSim(app, url)`.
- `Engine`, `SimRequest`, `step_duration_s` (worker.sim.engine): the pure engine model;
  `replay(config, arrivals)` (worker.sim.replay) predicts timings offline.
"""

from worker.sim.config import ConfigError, SimConfig

__all__ = ["ConfigError", "SimConfig"]
