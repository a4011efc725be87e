"""Reading a starting vLLM server's phase from its log (lines from a real vLLM 0.32.0 log)."""

from __future__ import annotations

from pathlib import Path

from tests.worker.vllm_startup_log import EMBED_PHASES, EMBED_STARTUP
from worker.phases import LogPhases


def test_a_real_startup_log_goes_through_every_phase_in_order(tmp_path: Path) -> None:
    log = tmp_path / "embed.log"
    log.write_text("\n".join(EMBED_STARTUP) + "\n")
    phases = LogPhases(log)
    assert phases.poll() == "starting the API server"
    assert phases.seen == EMBED_PHASES


def test_the_log_is_followed_as_it_grows_even_mid_line(tmp_path: Path) -> None:
    log = tmp_path / "embed.log"
    log.write_bytes(b"")
    phases = LogPhases(log)
    assert phases.poll() == "starting"
    data = ("\n".join(EMBED_STARTUP) + "\n").encode()
    cut = data.index(b"Starting to load model") + 8  # the line arrives in two writes
    with log.open("ab") as out:
        out.write(data[:cut])
        out.flush()
        assert phases.poll() == "initializing the engine"
        out.write(data[cut : data.index(b"Warming up model")])
        out.flush()
        assert phases.poll() == "loading weights"
        out.write(data[data.index(b"Warming up model") :])
    assert phases.poll() == "starting the API server"
    assert phases.seen == EMBED_PHASES


def test_a_phase_never_goes_back_and_noise_changes_nothing(tmp_path: Path) -> None:
    log = tmp_path / "gpu.log"
    log.write_text(
        "(Worker pid=1) INFO [gpu_model_runner.py:5040] Starting to load model org/m...\n"
        "(Worker pid=1) INFO [backends.py:399] Compiling a graph for compile range (1, 8192) takes 20.1 s\n"
        # on a GPU the KV cache is sized after the compile; a tqdm bar redraws with carriage returns
        "(Worker pid=1) INFO [gpu_worker.py:760] Available KV cache memory: 60 GiB\n"
        "Capturing CUDA graphs (mixed prefill-decode, PIECEWISE): 10%|#\rCapturing CUDA graphs: 100%|##########\r"
        "some line nobody knows\n"
    )
    phases = LogPhases(log)
    assert phases.poll() == "compiling / warming up"
    assert phases.seen == ["loading weights", "compiling / warming up"]


def test_a_missing_log_is_starting(tmp_path: Path) -> None:
    assert LogPhases(tmp_path / "absent.log").poll() == "starting"
