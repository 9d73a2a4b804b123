"""Resolve ``--model``: a local folder, a GGUF file or Ollama model (converted once, see
:mod:`mlx_lora.model.gguf_import`), or an id fetched from ModelScope or Hugging Face.

The seed downloads ``qwen/Qwen1.5-4B-Chat`` from ModelScope, so ModelScope is the default source.
Only the files a model needs are fetched (weights, configs, tokenizer, template), both hubs keep
their own cache, and a cached copy is used without touching the network.
"""

from __future__ import annotations

from pathlib import Path

from mlx_lora.core.errors import MlxLoraError
from mlx_lora.core.files import read_json
from mlx_lora.core.weights import weight_files
from mlx_lora.model.gguf_import import is_gguf_model, resolve_gguf_model

DEFAULT_MODEL = "qwen/Qwen1.5-4B-Chat"
SOURCES = ("auto", "modelscope", "huggingface")

# Everything mlx-lm, transformers and llama.cpp read from a model folder; nothing else
# (no PyTorch .bin duplicates, no ONNX/GGUF variants that would multiply the download).
ALLOW_PATTERNS = [
    "*.json",
    "*.safetensors",
    "tokenizer.model",
    "*.tiktoken",
    "merges.txt",
    "vocab.txt",
    "*.jinja",
    "*.py",
]
# What the memory plan reads: the configs and the tokenizer, no weights.
METADATA_PATTERNS = [p for p in ALLOW_PATTERNS if p not in ("*.safetensors", "*.py")]


def looks_like_path(model: str) -> bool:
    """A path is anything that exists or is spelled like one; ``org/name`` is a hub id."""
    if Path(model).expanduser().exists():
        return True
    return model.startswith((".", "/", "~")) or model.count("/") != 1


def check_model_dir(path: Path) -> Path:
    """Fail early, in one line, on a folder that mlx-lm could not load."""
    if not path.is_dir():
        raise MlxLoraError(
            f"model folder {path} does not exist; pass --model DIR or a hub id like {DEFAULT_MODEL}"
        )
    config = path / "config.json"
    if not config.is_file():
        raise MlxLoraError(
            f"{path} has no config.json: it is not a Hugging Face model folder; pass the folder "
            "that holds config.json and *.safetensors"
        )

    read_json(config)
    weight_files(path)  # every shard the index lists is there (one-line errors otherwise)
    return path


def check_config_dir(path: Path) -> Path:
    """A folder with a readable ``config.json`` (weights not needed: the memory plan)."""
    if not (path / "config.json").is_file():
        raise MlxLoraError(
            f"{path} has no config.json; pass --model DIR of a Hugging Face model folder or an id"
        )
    return path


def _from_modelscope(model_id: str, local_only: bool, patterns: list[str]) -> Path:
    import logging

    from modelscope import snapshot_download

    for name in (
        "modelscope",
        "modelscope_hub",
    ):  # its retry warnings would bury our one-line error
        logging.getLogger(name).setLevel(logging.ERROR)
    return Path(snapshot_download(model_id, allow_patterns=patterns, local_files_only=local_only))


def _from_huggingface(model_id: str, local_only: bool, patterns: list[str]) -> Path:
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(model_id, allow_patterns=patterns, local_files_only=local_only))


_FETCHERS = {"modelscope": _from_modelscope, "huggingface": _from_huggingface}
_NAMES = {"modelscope": "ModelScope", "huggingface": "Hugging Face"}


def resolve_model(model: str, source: str = "auto", *, weights: bool = True) -> Path:
    """Return a local folder for ``model``, downloading it if it is a hub id.

    ``auto`` means: a cached copy from either hub, else ModelScope, else Hugging Face.
    ``weights=False`` fetches only the configs and tokenizer (all the memory plan reads).
    """
    if source not in SOURCES:
        raise MlxLoraError(f"unknown --model-source {source!r}; choose one of {', '.join(SOURCES)}")

    check = check_model_dir if weights else check_config_dir
    if is_gguf_model(model):  # model.gguf or ollama:NAME[:TAG] → a cached converted folder
        return check(resolve_gguf_model(model))
    if looks_like_path(model):
        return check(Path(model).expanduser().resolve())
    return fetch_hub_model(model, source, weights=weights)


def fetch_hub_model(model: str, source: str = "auto", *, weights: bool = True) -> Path:
    """The cached (else downloaded) folder of the hub id ``model``, never a local folder of that
    name: the studio passes ids here so that ``org/name`` in its working directory, outside
    ``--root``, is not picked up."""
    if source not in SOURCES:
        raise MlxLoraError(f"unknown --model-source {source!r}; choose one of {', '.join(SOURCES)}")
    check = check_model_dir if weights else check_config_dir
    patterns = ALLOW_PATTERNS if weights else METADATA_PATTERNS
    order = ["modelscope", "huggingface"] if source == "auto" else [source]
    for name in order:  # a cached copy first: no network, no surprise re-download
        try:
            return check(_FETCHERS[name](model, True, patterns))
        except MlxLoraError:
            raise
        except Exception:  # noqa: BLE001 - any miss in the cache just means "not cached"
            pass
    reasons = []
    for name in order:
        try:
            return check(_FETCHERS[name](model, False, patterns))
        except MlxLoraError:
            raise
        except Exception as e:  # noqa: BLE001 - network, auth, unknown id: all reported below
            reasons.append(
                f"{_NAMES[name]}: {type(e).__name__}: "
                f"{str(e).splitlines()[0][:160] if str(e) else ''}"
            )
    raise MlxLoraError(
        f"cannot fetch model '{model}' ({'; '.join(reasons)}); check the id and your network, "
        f"or download it elsewhere and pass --model DIR"
    )
