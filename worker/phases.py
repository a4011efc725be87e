"""How far a starting vLLM server has got, read from its log as it grows.

vLLM says nothing machine-readable while it starts, but a few INFO lines mark each step. They were read off
vLLM 0.32.0's log (CPU build, `switchyard up`'s chat and embedding workers) and its source for the GPU-only
ones (CUDA graphs, torch.compile). A line nobody recognises changes nothing, so a vLLM release that rewords one
only makes that phase go unreported; /health stays the one test of ready.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

STARTING = "starting"
READY = "ready"

# In the order vLLM goes through them; a phase never goes back (on a GPU the KV cache is sized after the
# compile, so its lines arrive late and are ignored). Each: (phase shown, substrings of the log lines).
VLLM_PHASES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("initializing the engine", ("Initializing a V1 LLM engine",)),
    ("loading weights", ("Starting to load model",)),
    (
        "compiling / warming up",
        (
            "Warming up model for the compilation",  # CPU
            "Compiling a graph for",  # torch.compile (GPU, and CPU when it compiles)
            "torch.compile takes",
            "Capturing CUDA graphs",
        ),
    ),
    ("starting the API server", ("init engine (profile, create kv cache", "Starting vLLM server on")),
)


def vllm_phase(line: str) -> int | None:
    """The index in VLLM_PHASES that this log line starts, or None."""
    for index, (_, markers) in enumerate(VLLM_PHASES):
        if any(marker in line for marker in markers):
            return index
    return None


@dataclass
class LogPhases:
    """Follows one vLLM log file from where it last read; `phase` is the furthest step seen so far."""

    path: Path
    _offset: int = 0
    _partial: bytes = b""
    _index: int = -1
    _seen: list[str] = field(default_factory=list)

    @property
    def phase(self) -> str:
        return VLLM_PHASES[self._index][0] if self._index >= 0 else STARTING

    @property
    def seen(self) -> list[str]:
        """Every phase reported, in order (for tests and the plain view)."""
        return list(self._seen)

    def poll(self) -> str:
        """Read what was appended since the last call; returns the current phase."""
        try:
            with self.path.open("rb") as log:
                log.seek(self._offset)
                chunk = log.read()
        except OSError:
            return self.phase
        self._offset += len(chunk)
        # tqdm bars redraw with \r: treat it as a line end too; keep an unfinished last line for next time
        lines = (self._partial + chunk).replace(b"\r", b"\n").split(b"\n")
        self._partial = lines.pop()
        for raw in lines:
            index = vllm_phase(raw.decode("utf-8", "replace"))
            if index is not None and index > self._index:
                self._index = index
                self._seen.append(VLLM_PHASES[index][0])
        return self.phase
