"""Lines of a real vLLM 0.32.0 (CPU build) startup log, from `switchyard up`'s embedding worker, in order.

Kept verbatim (long lines cut after the part that matters) with the noise between the steps, so the phase
reader is tested on what vLLM really prints. The phases each line starts are noted beside it.
"""

EMBED_STARTUP = [
    "switchyard-worker: starting vLLM (cpu): /venv/bin/python -m vllm.entrypoints.openai.api_server --model "
    "/models/all-minilm-l6-v2 --served-model-name minilm --host 127.0.0.1 --port 23002 --dtype bfloat16",
    "Triton is installed, but doesn't include CPU backend. Disabling Triton.",
    "(APIServer pid=14437) INFO 12-01 23:03:19 [api_utils.py:347]  ▄▄ ▄█ █     █     █ ▀▄▀ █  version 0.32.0",
    "(APIServer pid=14437) INFO 12-01 23:03:19 [model.py:733] Resolved architecture: BertModel",
    # -> initializing the engine
    "(EngineCore pid=14573) INFO 12-01 23:03:31 [core.py:133] Initializing a V1 LLM engine (v0.32.0) with config: "
    "model='/models/all-minilm-l6-v2', speculative_config=None",
    "(EngineCore pid=14573) INFO 12-01 23:03:31 [ompmultiprocessing.py:185] OpenMP thread binding info: ",
    # -> loading weights
    "(Worker pid=14706) INFO 12-01 23:03:44 [cpu_model_runner.py:68] Starting to load model "
    "/models/all-minilm-l6-v2...",
    "Loading safetensors checkpoint shards:   0% Completed | 0/1 [00:00<?, ?it/s]",
    "Loading safetensors checkpoint shards: 100% Completed | 1/1 [00:00<00:00, 201.15it/s]",
    "(Worker pid=14706) INFO 12-01 23:03:45 [default_loader.py:501] Loading weights took 0.20 seconds",
    # -> compiling / warming up
    "(Worker pid=14706) INFO 12-01 23:03:46 [cpu_model_runner.py:87] Warming up model for the compilation...",
    "(Worker pid=14706) WARNING 12-01 23:03:50 [decorators.py:333] [backbone] Compiling model again due to a load "
    "failure from /root/.cache/vllm/torch_compile_cache/torch_aot_compile/894be6/rank_0_0/model",
    "(Worker pid=14706) INFO 12-01 23:04:03 [cpu_model_runner.py:91] Warming up done.",
    # -> starting the API server
    "(EngineCore pid=14573) INFO 12-01 23:04:03 [core.py:402] init engine (profile, create kv cache, warmup model) "
    "took 16.98 s",
    "(APIServer pid=14437) INFO 12-01 23:04:03 [entry.py:140] Starting vLLM server on http://127.0.0.1:23002",
    "INFO:     Started server process [14437]",
    "INFO:     Application startup complete.",
]

EMBED_PHASES = ["initializing the engine", "loading weights", "compiling / warming up", "starting the API server"]
