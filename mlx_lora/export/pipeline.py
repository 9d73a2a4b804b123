"""``python -m mlx_lora.export``: adapter (+ base) → GGUF → Ollama Modelfile, optionally verified.

The seed's last steps (merge.py, llama.cpp's converter with torch, a hand-written Modelfile with
another model's tokens, ``ollama create``) are one command here, built from the pieces that
already prove themselves: :func:`mlx_lora.export.fuse.fuse` (the one merge),
:mod:`mlx_lora.gguf.writer`,
:mod:`mlx_lora.ollama.modelfile` (the TEMPLATE measured from the model's own chat template) and
:mod:`mlx_lora.verify.checks`.

Two formats. **gguf** (default) for llama.cpp and Ollama: f32/f16/bf16/q8_0 are written directly,
the smaller types (q4_K_M, q5_K_M, q6_K, q4_0, ...) by llama.cpp's own quantizer from our f16
(:mod:`mlx_lora.gguf.quant`). **mlx**: ``OUT/NAME-mlx``, an MLX folder (4- or 8-bit) that
``mlx_lm.generate``/``mlx_lm.server``/LM Studio open unchanged (:mod:`mlx_lora.export.mlx`).

Two GGUF modes. **full**: fuse into ``OUT/NAME-hf`` → ``OUT/NAME.gguf`` → ``FROM ./NAME.gguf``.
**adapter**: the base model's GGUF (``OUT/NAME-base.gguf``) + a GGUF LoRA adapter
(``OUT/NAME-lora.gguf``) → ``FROM`` + ``ADAPTER``; Ollama accepts safetensors adapters only for
llama/gemma2, so a Qwen adapter has to be a GGUF one. Without ``--adapter`` the model is converted
as it is. ``OUT/export.json`` records what was written, so ``python -m mlx_lora.verify
--export-dir OUT`` can check it later.
"""

from __future__ import annotations

import re
import shlex
import shutil
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlx_lora.config import opt
from mlx_lora.core.errors import MlxLoraError
from mlx_lora.core.files import check_apart, read_json, scratch_file, write_error_detail
from mlx_lora.core.units import human_bytes, path_bytes
from mlx_lora.export.fuse import fuse
from mlx_lora.export.mlx import check_quantization, run_commands, write_mlx_model
from mlx_lora.gguf.arch import family_of
from mlx_lora.gguf.quant import (
    made_by_llama_cpp,
    normalize_type,
    require_quantizer,
    write_quantized_gguf,
)
from mlx_lora.gguf.vocab import adds_bos
from mlx_lora.gguf.writer import GGUF_EXPORT_TYPES, gguf_arch, write_gguf, write_lora_gguf
from mlx_lora.model.hub import SOURCES
from mlx_lora.model.load import DTYPES, base_model_dir
from mlx_lora.model.lora import Adapter, check_base, read_adapter
from mlx_lora.model.meta import end_tokens, generation_config, training_system_prompt
from mlx_lora.model.prompt import load_hf_tokenizer
from mlx_lora.ollama.modelfile import (
    generation_params,
    go_template_for_tokenizer,
    load_template_file,
    ollama_create,
    write_modelfile,
)
from mlx_lora.verify.checks import verify_export
from mlx_lora.verify.manifest import MANIFEST, Manifest

MODES = ("full", "adapter")
FORMATS = ("gguf", "mlx")
UNQUANTIZED = ("f32", "f16", "bf16")
MODELFILE = "Modelfile"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass
class ExportConfig:
    model: str | None = opt(
        None,
        "base model (id or folder), or a fused folder; default: the base recorded in --adapter",
    )
    adapter: str | None = opt(
        None,
        "adapter folder (a training --output-dir or checkpoint-N); without it the model is "
        "converted as it is",
    )
    output_dir: str = opt(
        "export",
        "folder for the GGUF file(s), the Modelfile, export.json and (full mode) the fused "
        "NAME-hf folder",
    )
    format: str = opt(
        "gguf",
        "gguf: GGUF + Modelfile for llama.cpp/Ollama; mlx: a quantized MLX folder NAME-mlx for "
        "mlx_lm.generate/mlx_lm.server/LM Studio",
        choices=list(FORMATS),
    )
    gguf_type: str = opt(
        "f16",
        "GGUF weight type (norms and biases stay f32); f32/f16/bf16/q8_0 are written directly, "
        "the others by llama.cpp's quantizer (needs llama-cpp-python)",
        choices=list(GGUF_EXPORT_TYPES),
    )
    imatrix: str | None = opt(
        None, "importance matrix (llama-imatrix output, .gguf or .dat) for llama.cpp's quantizer"
    )
    q_bits: int | None = opt(
        None, "--format mlx: bits per weight (default 4)", choices=[2, 3, 4, 5, 6, 8]
    )
    q_group_size: int | None = opt(
        None, "--format mlx: weights per quantization group (default 64)", choices=[32, 64, 128]
    )
    eval_data: str | None = opt(
        None,
        "held-out texts (a dataset file) for --verify's quality figures; default: the training "
        "run's validation split",
    )
    name: str | None = opt(
        None,
        "model name for the files and for ollama (default: the adapter's or model's folder name)",
    )
    num_ctx: int = opt(
        4096,
        "context length Ollama serves (PARAMETER num_ctx); Dify's context length must not exceed "
        "it",
    )
    mode: str = opt(
        "full",
        "full: one fused GGUF; adapter: base GGUF + GGUF LoRA adapter (Modelfile ADAPTER)",
        choices=list(MODES),
    )
    template: str | None = opt(
        None,
        "Go text/template file for the Modelfile TEMPLATE, for chat templates mlx_lora does not "
        "recognise",
    )
    system_prompt: str | None = opt(
        None,
        "Modelfile SYSTEM; default: the system prompt used in training, else the chat template's "
        "own",
    )
    dtype: str | None = opt(
        None,
        "dtype of the fused folder (default: float32 for --gguf-type f32, else the base's own)",
        choices=list(DTYPES),
    )
    ollama_create: bool = opt(
        False, "run `ollama create NAME -f OUT/Modelfile` at the end (needs ollama on PATH)"
    )
    ollama_quantize: str | None = opt(
        None,
        "let ollama quantize while creating (-q), e.g. q4_K_M; implies --ollama-create, needs "
        "--gguf-type f16/f32/bf16",
    )
    verify: bool = opt(
        False,
        "check the GGUF against the HF folder and MLX (llama.cpp checks need: pip install "
        '"mlx_lora[verify]"); exit 1 on mismatch',
    )
    overwrite: bool = opt(False, "replace the artifacts of an earlier export in --output-dir")
    model_source: str = opt("auto", "where a model id is fetched from", choices=list(SOURCES))


@dataclass
class ExportResult:
    """Every artifact an export wrote (paths are absolute), and the verify report if asked for."""

    output_dir: Path
    name: str
    mode: str
    gguf_type: str
    gguf: Path | None  # the model GGUF (full) or the base GGUF (adapter mode); None: --format mlx
    modelfile: Path | None
    manifest: Path
    hf_dir: Path  # the folder the GGUF was written from: fused folder, or the base
    base_dir: Path
    adapter: Path | None = None
    fused_dir: Path | None = None
    lora_gguf: Path | None = None
    system_prompt: str | None = None
    stops: list[str] = field(default_factory=list)
    ollama_created: bool = False
    report: Any = None  # mlx_lora.verify.checks.Report when --verify
    timings: dict[str, float] = field(default_factory=dict)
    format: str = "gguf"
    mlx_dir: Path | None = None
    quantization: dict | None = None  # llama.cpp's quantizer (GGUF) or MLX's (mlx folder)

    @property
    def artifacts(self) -> list[Path]:
        paths = (
            self.fused_dir,
            self.gguf,
            self.lora_gguf,
            self.mlx_dir,
            self.modelfile,
            self.manifest,
        )
        return [p for p in paths if p is not None]


GENERIC_DIRS = {"output", "outputs", "adapter", "adapters", "lora", "out", "checkpoint"}


def default_name(model: str, adapter: Path | None) -> str:
    """An Ollama-friendly name: the adapter's folder (``checkpoint-N`` gets its run's name), or
    ``<base>-lora`` when that folder has a generic name like ``output``; else the model's name."""

    def slug(raw: str) -> str:
        return re.sub(r"[^a-z0-9._-]+", "-", raw.lower()).strip("-._")

    base = slug(Path(str(model).rstrip("/")).name) or "model"
    if adapter is None:
        return base
    a = adapter.resolve()
    raw = f"{a.parent.name}-{a.name}" if a.name.startswith("checkpoint-") else a.name
    if a.name.startswith("checkpoint-") and a.parent.name.lower() in GENERIC_DIRS:
        raw = f"{base}-lora-{a.name}"
    elif a.name.lower() in GENERIC_DIRS:
        raw = f"{base}-lora"
    return slug(raw) or f"{base}-lora"


def _check_format(cfg: ExportConfig) -> None:
    """Flags that belong to the other format are refused rather than silently ignored."""

    if cfg.format not in FORMATS:
        raise MlxLoraError(f"unknown --format {cfg.format!r}; choose gguf or mlx")
    cfg.gguf_type = normalize_type(cfg.gguf_type)
    if cfg.format == "mlx":
        if cfg.mode != "full" or cfg.ollama_create or cfg.ollama_quantize or cfg.imatrix:
            raise MlxLoraError(
                "--format mlx writes one fused MLX folder: drop --mode adapter, --ollama-create, "
                "--ollama-quantize and --imatrix (they are for --format gguf)"
            )
        if cfg.gguf_type != "f16":
            raise MlxLoraError("--gguf-type is for --format gguf; use --q-bits with --format mlx")
        check_quantization(cfg.q_bits or 4, cfg.q_group_size or 64)
        return
    if cfg.q_bits is not None or cfg.q_group_size is not None:
        raise MlxLoraError("--q-bits/--q-group-size are for --format mlx; use --gguf-type for GGUF")
    if cfg.imatrix and not made_by_llama_cpp(cfg.gguf_type):
        raise MlxLoraError(
            f"--imatrix is used by llama.cpp's quantizer; --gguf-type {cfg.gguf_type} is written "
            "without it (pick a type such as q4_k_m)"
        )
    if cfg.imatrix and not Path(cfg.imatrix).is_file():
        raise MlxLoraError(f"--imatrix {cfg.imatrix} does not exist; pass a llama-imatrix file")
    require_quantizer(cfg.gguf_type)


def _check(cfg: ExportConfig) -> None:
    _check_format(cfg)
    if cfg.mode not in MODES:
        raise MlxLoraError(f"unknown --mode {cfg.mode!r}; choose full or adapter")
    if cfg.mode == "adapter" and not cfg.adapter:
        raise MlxLoraError(
            "--mode adapter needs --adapter OUT (the adapter to write as a GGUF LoRA adapter)"
        )
    if cfg.name is not None and not _NAME.fullmatch(cfg.name):
        raise MlxLoraError(
            f"--name {cfg.name!r} must be letters, digits, '.', '_' or '-' (it names files and "
            "the Ollama model)"
        )
    if not isinstance(cfg.num_ctx, int) or cfg.num_ctx <= 0:
        raise MlxLoraError(f"--num-ctx must be a positive number of tokens, got {cfg.num_ctx}")
    if cfg.ollama_quantize and cfg.gguf_type not in UNQUANTIZED:
        raise MlxLoraError(
            f"--ollama-quantize needs an unquantized GGUF, but --gguf-type {cfg.gguf_type} is "
            "already quantized: drop --ollama-quantize (or use --gguf-type f16)"
        )
    if cfg.dtype is not None and cfg.dtype not in DTYPES:
        raise MlxLoraError(f"unknown --dtype {cfg.dtype!r}; choose {', '.join(DTYPES)}")


def _template(cfg: ExportConfig, tokenizer: Any, base_dir: Path) -> Any:
    """The Modelfile TEMPLATE: measured from the chat template for the add-BOS rule the GGUF will
    record (llama.cpp adds BOS only when it says so), ``{{ .Prompt }}`` without a chat template,
    or the user's ``--template FILE``."""

    add_bos = adds_bos(tokenizer, base_dir)
    if cfg.template is None:
        return go_template_for_tokenizer(tokenizer, add_bos=add_bos)
    default_system = None
    try:  # the chat template's own default system prompt, when mlx_lora can read the template
        default_system = go_template_for_tokenizer(tokenizer, add_bos=add_bos).default_system
    except MlxLoraError:
        pass
    return load_template_file(Path(cfg.template), default_system=default_system)


def _rel(path: Path | None, out: Path) -> str | None:
    if path is None:
        return None
    try:
        return str(path.resolve().relative_to(out.resolve()))
    except ValueError:
        return str(path.resolve())


@contextmanager
def _no_partial_export(out: Path, artifacts: list[Path]) -> Iterator[None]:
    """Remove the artifacts this export created when a later stage fails: half a set (a base GGUF
    without its adapter, a GGUF without a Modelfile) must not look like a finished export."""
    new = [p for p in artifacts if not p.exists()]
    try:
        yield
    except BaseException as e:
        for p in new:
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
        if isinstance(e, OSError | RuntimeError):  # MLX reports a full disk as RuntimeError
            detail = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            raise MlxLoraError(
                f"cannot write the export to {out} ({detail}); free disk space or choose another "
                "--output-dir"
            ) from None
        raise


def _stage(name: str, log: bool) -> float:
    if log:
        print(f"→ {name}", flush=True)
    return time.perf_counter()


@dataclass
class _Job:
    """What one export will write, decided (and checked) before anything is written."""

    cfg: ExportConfig
    adapter: Adapter | None
    base_dir: Path
    name: str
    tokenizer: Any
    template: Any  # mlx_lora.ollama.modelfile.GoTemplate; None for --format mlx
    quantization: dict | None = None

    @property
    def out(self) -> Path:
        return Path(self.cfg.output_dir)

    @property
    def full(self) -> bool:
        return self.cfg.mode == "full"

    @property
    def fused_dir(self) -> Path | None:
        return self.out / f"{self.name}-hf" if self.full and self.adapter is not None else None

    @property
    def mlx(self) -> bool:
        return self.cfg.format == "mlx"

    @property
    def gguf(self) -> Path | None:
        if self.mlx:
            return None
        return self.out / (f"{self.name}.gguf" if self.full else f"{self.name}-base.gguf")

    @property
    def lora_gguf(self) -> Path | None:
        return None if self.full else self.out / f"{self.name}-lora.gguf"

    @property
    def mlx_dir(self) -> Path | None:
        return self.out / f"{self.name}-mlx" if self.mlx else None

    @property
    def modelfile(self) -> Path | None:
        return None if self.mlx else self.out / MODELFILE

    @property
    def artifacts(self) -> list[Path]:
        paths = (
            self.fused_dir,
            self.gguf,
            self.lora_gguf,
            self.mlx_dir,
            self.modelfile,
            self.out / MANIFEST,
        )
        return [p for p in paths if p is not None]


def _prepare(cfg: ExportConfig) -> _Job:
    """Read the adapter and base, derive the TEMPLATE (an unrecognised chat template should fail
    before minutes of converting), refuse to overwrite an earlier export."""
    adapter = read_adapter(Path(cfg.adapter)) if cfg.adapter else None
    if adapter is not None and adapter.use_dora and cfg.mode == "adapter":
        raise MlxLoraError(
            "--mode adapter cannot carry a DoRA adapter (llama.cpp's GGUF LoRA is plain LoRA); "
            "use --mode full, which fuses DoRA exactly"
        )
    base_dir = base_model_dir(cfg.model, adapter, cfg.model_source)
    if adapter is not None:
        check_base(adapter, read_json(base_dir / "config.json"))
    tokenizer = load_hf_tokenizer(base_dir)
    model = cfg.model or (adapter.base_model if adapter else None) or str(base_dir)
    name = cfg.name or default_name(str(model), adapter.directory if adapter else None)
    template = None if cfg.format == "mlx" else _template(cfg, tokenizer, base_dir)
    job = _Job(cfg, adapter, base_dir, name, tokenizer, template)
    inputs = {"--model": base_dir, "--adapter": adapter.directory if adapter else None}
    check_apart(job.out, {**inputs, "--eval-data": cfg.eval_data})
    existing = [p for p in job.artifacts if p.exists()]
    if existing and not cfg.overwrite:
        raise MlxLoraError(
            f"{existing[0]} already exists; pass --overwrite or choose another --output-dir / "
            "--name"
        )
    try:
        job.out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MlxLoraError(
            f"cannot write to --output-dir {job.out} ({write_error_detail(e)}); choose a writable "
            "folder"
        ) from None
    return job


def _refuse_other_architecture(job: _Job, log: bool) -> None:
    """An architecture mlx_lora does not write as GGUF: still write the fused folder (a complete
    HF model), then stop with one line naming llama.cpp's converter on it as the way on."""
    config = read_json(job.base_dir / "config.json", required=True)
    if gguf_arch(config) is not None:
        return
    folder = job.base_dir
    if job.fused_dir is not None:
        _stage(f"fusing {job.adapter.directory} into {job.base_dir.name} → {job.fused_dir}", log)
        dtype = job.cfg.dtype or ("float32" if job.cfg.gguf_type == "f32" else None)
        folder = fuse(
            str(job.base_dir), job.adapter.directory, job.fused_dir, dtype=dtype, overwrite=True
        )
    elif job.adapter is not None:  # adapter mode: the base and the adapter convert separately
        raise MlxLoraError(
            f"{job.base_dir}: architecture {(config.get('architectures') or [None])[0]!r} is not "
            "written to GGUF directly; export --mode full (mlx_lora writes the fused folder), or "
            "convert the base with llama.cpp's convert_hf_to_gguf.py and the adapter with its "
            "convert_lora_to_gguf.py"
        )
    family_of(config, Path(folder))  # raises the one-line refusal naming the converter


def _fuse(job: _Job, log: bool, timings: dict[str, float]) -> Path:
    """The folder the exported model is written from: fused (fuse's one merge, into the original
    base) when there is an adapter in full mode, else the base itself."""
    if job.fused_dir is None:
        return job.base_dir

    cfg = job.cfg
    t = _stage(f"fusing {job.adapter.directory} into {job.base_dir.name} → {job.fused_dir}", log)
    dtype = cfg.dtype or ("float32" if cfg.gguf_type == "f32" and not job.mlx else None)
    hf_dir = fuse(
        str(job.base_dir), job.adapter.directory, job.fused_dir, dtype=dtype, overwrite=True
    )
    timings["fuse"] = time.perf_counter() - t
    return Path(hf_dir)


def _write_ggufs(
    job: _Job,
    hf_dir: Path,
    progress: bool,
    log: bool,
    timings: dict[str, float],
    reference: Path | None = None,
) -> None:
    """The GGUF LoRA adapter (adapter mode) and the model GGUF: written directly, or f16 by our
    writer then quantized by llama.cpp (the LoRA adapter stays f16/f32 either way)."""
    cfg = job.cfg
    if job.lora_gguf is not None:  # first: it checks the adapter against the base in seconds
        t = _stage(f"writing the GGUF LoRA adapter {job.lora_gguf}", log)
        lora_type = "f32" if cfg.gguf_type == "f32" else "f16"
        write_lora_gguf(
            job.adapter,
            job.base_dir,
            job.lora_gguf,
            lora_type,
            progress=progress,
            name=f"{job.name}-lora",
        )
        timings["lora_gguf"] = time.perf_counter() - t
    t = _stage(f"writing {job.gguf} ({cfg.gguf_type})", log)
    if made_by_llama_cpp(cfg.gguf_type):
        job.quantization = write_quantized_gguf(
            hf_dir,
            job.gguf,
            cfg.gguf_type,
            progress=progress,
            name=job.name,
            imatrix=Path(cfg.imatrix) if cfg.imatrix else None,
            reference=reference,
        )
        if log and job.quantization.get("fallback_note"):
            print(f"  note: {job.quantization['fallback_note']}", flush=True)
    else:
        write_gguf(hf_dir, job.gguf, cfg.gguf_type, progress=progress, name=job.name)
    timings["gguf"] = time.perf_counter() - t


def _write_mlx(job: _Job, hf_dir: Path, log: bool, timings: dict[str, float]) -> None:

    cfg = job.cfg
    bits, group = cfg.q_bits or 4, cfg.q_group_size or 64
    t = _stage(f"writing the {bits}-bit MLX folder {job.mlx_dir}", log)
    job.quantization = write_mlx_model(
        hf_dir,
        job.mlx_dir,
        bits=bits,
        group_size=group,
        dtype=cfg.dtype,
        system_prompt=_system_prompt(job, hf_dir),
    )
    timings["mlx"] = time.perf_counter() - t


def _system_prompt(job: _Job, hf_dir: Path) -> str | None:
    if job.cfg.system_prompt is not None:
        return job.cfg.system_prompt
    return training_system_prompt(hf_dir, job.adapter)


def _write_modelfile(job: _Job, hf_dir: Path) -> tuple[str | None, list[str]]:
    """The Modelfile (TEMPLATE, SYSTEM, stops, sampling); returns its system prompt and stops."""

    cfg = job.cfg
    system = _system_prompt(job, hf_dir)
    gen = generation_config(hf_dir)
    stops = list(dict.fromkeys([*job.template.stops, *end_tokens(job.tokenizer, gen)]))
    write_modelfile(
        job.out,
        filename=MODELFILE,
        from_path=f"./{job.gguf.name}",
        template=job.template,
        system=system,
        stops=stops,
        num_ctx=cfg.num_ctx,
        params=generation_params(gen),
        adapter_path=f"./{job.lora_gguf.name}" if job.lora_gguf else None,
    )
    return system or job.template.default_system, stops


def _result(job: _Job, hf_dir: Path) -> ExportResult:
    """The Modelfile (GGUF) and the ``export.json`` manifest; the result lists every artifact."""
    cfg = job.cfg
    if job.mlx:
        gen = generation_config(hf_dir)
        system, stops = _system_prompt(job, hf_dir), list(end_tokens(job.tokenizer, gen))
    else:
        system, stops = _write_modelfile(job, hf_dir)

    def resolved(p: Path | None) -> Path | None:
        return p.resolve() if p is not None else None

    r = ExportResult(
        output_dir=job.out.resolve(),
        name=job.name,
        mode=cfg.mode,
        gguf_type=cfg.gguf_type,
        gguf=resolved(job.gguf),
        modelfile=resolved(job.modelfile),
        manifest=(job.out / MANIFEST).resolve(),
        hf_dir=hf_dir.resolve(),
        base_dir=job.base_dir.resolve(),
        adapter=job.adapter.directory.resolve() if job.adapter else None,
        fused_dir=resolved(job.fused_dir),
        lora_gguf=resolved(job.lora_gguf),
        system_prompt=system,
        stops=stops,
        format=cfg.format,
        mlx_dir=resolved(job.mlx_dir),
        quantization=job.quantization,
    )
    _manifest(r, cfg).write(r.output_dir)
    return r


def _manifest(r: ExportResult, cfg: ExportConfig) -> Manifest:
    out = r.output_dir
    return Manifest(
        name=r.name,
        format=r.format,
        mode=r.mode,
        gguf_type=r.gguf_type if r.format == "gguf" else None,
        gguf=_rel(r.gguf, out),
        lora_gguf=_rel(r.lora_gguf, out),
        mlx_dir=_rel(r.mlx_dir, out),
        hf_dir=_rel(r.hf_dir, out),
        base_dir=str(r.base_dir),
        adapter=str(r.adapter) if r.adapter else None,
        modelfile=_rel(r.modelfile, out),
        num_ctx=cfg.num_ctx if r.format == "gguf" else None,
        system_prompt=r.system_prompt,
        stops=r.stops,
        quantization=r.quantization,
        eval_data=str(Path(cfg.eval_data).resolve()) if cfg.eval_data else None,
    )


def _ollama(cfg: ExportConfig, result: ExportResult, log: bool) -> None:
    """``ollama create`` when asked for, never on top of a failed verification."""

    if not (cfg.ollama_create or cfg.ollama_quantize):
        return
    name = result.name
    if result.report is not None and not result.report.ok:
        if log:
            print(
                "not running ollama create: verification failed (fix the mismatch, then: ollama "
                f"create {name} -f {result.modelfile})"
            )
        return
    t = _stage(f"ollama create {name}", log)
    ollama_create(name, result.modelfile, cfg.ollama_quantize)
    result.ollama_created = True
    result.timings["ollama_create"] = time.perf_counter() - t
    if log:
        print(f"created the Ollama model {name}; chat with: ollama run {name}")


def _write_all(
    job: _Job, progress: bool, log: bool, timings: dict, reference: Path | None
) -> ExportResult:
    with _no_partial_export(job.out, job.artifacts):  # a failed export leaves none of its files
        hf_dir = _fuse(job, log, timings)
        if job.mlx:
            _write_mlx(job, hf_dir, log, timings)
        else:
            _write_ggufs(job, hf_dir, progress, log, timings, reference)
        return _result(job, hf_dir)


def export(cfg: ExportConfig, *, progress: bool = True, log: bool = True) -> ExportResult:
    """Fuse (if needed), write the GGUF(s) and the Modelfile (or the MLX folder), then verify /
    ``ollama create``."""
    _check(cfg)
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    job = _prepare(cfg)
    if log and getattr(job.template, "raw", False):
        print("no chat template (a base model): Modelfile TEMPLATE is the raw prompt {{ .Prompt }}")
    if not job.mlx:  # an MLX folder takes any architecture mlx-lm loads
        _refuse_other_architecture(job, log)
    with ExitStack() as keep:
        reference = None  # verify compares the quantized GGUF with the f16 llama.cpp read
        if cfg.verify and not job.mlx and made_by_llama_cpp(cfg.gguf_type):
            reference = keep.enter_context(scratch_file(job.gguf, "reference"))
        result = _write_all(job, progress, log, timings, reference)
        result.timings = timings
        if cfg.verify:
            t = _stage("verifying (read back, tokenization, logits, quality)", log)
            result.report = verify_export(result, reference_gguf=reference)
            timings["verify"] = time.perf_counter() - t
            if log:
                print(result.report.table())
    if log:
        print(summary(result))
    _ollama(cfg, result, log)
    timings["total"] = time.perf_counter() - t_start
    return result


def summary(r: ExportResult) -> str:
    """The artifact list and the commands to use them."""
    lines = ["artifacts:"]
    labels = [
        ("fused HF folder", r.fused_dir),
        ("GGUF" if r.mode == "full" else "base GGUF", r.gguf),
        ("GGUF LoRA adapter", r.lora_gguf),
        ("MLX folder", r.mlx_dir),
        ("Modelfile", r.modelfile),
        ("manifest", r.manifest),
    ]
    for label, path in labels:
        if path is not None:
            size = human_bytes(path_bytes(path))
            lines.append(f"  {label:<18} {path}{f'  ({size})' if size else ''}")
    if r.mlx_dir is not None:
        commands = run_commands(r.mlx_dir, r.system_prompt)
        return "\n".join([*lines, f"next: {commands[0]}", *(f"      {c}" for c in commands[1:])])
    create = shlex.join(["ollama", "create", r.name, "-f", str(r.modelfile)])
    lines.append(f"next: {create}" if not r.ollama_created else "ollama model created")
    lines.append(f"      ollama run {r.name}")
    return "\n".join(lines)
