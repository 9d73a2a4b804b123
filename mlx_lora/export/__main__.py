"""``python -m mlx_lora.export`` and ``mlx-lora export``: flags → config →
:mod:`mlx_lora.export.pipeline`."""

from __future__ import annotations

import sys

from mlx_lora.config import parse_config
from mlx_lora.core.cli import run
from mlx_lora.export.pipeline import ExportConfig, ExportResult, export

DESCRIPTION = """Export a fine-tuned model for llama.cpp and Ollama: fuse the adapter (or keep it as
a GGUF LoRA adapter), write the GGUF without llama.cpp or torch, and a Modelfile whose TEMPLATE,
SYSTEM and stop tokens come from the model's own chat template and training run."""

EPILOG = """examples:
  python -m mlx_lora.export --adapter output/huanhuan --output-dir export/huanhuan --verify
  python -m mlx_lora.export --adapter output/huanhuan --output-dir export/hh \
      --mode adapter --gguf-type q8_0
  python -m mlx_lora.export --adapter output/huanhuan --output-dir export/hh \
      --gguf-type q4_k_m --verify
  python -m mlx_lora.export --adapter output/huanhuan --output-dir export/hh-mlx \
      --format mlx --q-bits 4

files: OUT/NAME.gguf (or NAME-base.gguf + NAME-lora.gguf), OUT/Modelfile, OUT/export.json,
       OUT/NAME-hf/ (full mode), OUT/NAME-mlx/ (--format mlx)"""


def _lower_type(argv: list[str]) -> list[str]:
    """``--gguf-type Q4_K_M`` (llama.cpp's and Ollama's spelling) means q4_k_m."""
    out = list(argv)
    for i, a in enumerate(out):
        if a.startswith("--gguf-type="):
            out[i] = a.lower()
        elif a == "--gguf-type" and i + 1 < len(out):
            out[i + 1] = out[i + 1].lower()
    return out


def main(argv: list[str] | None = None) -> ExportResult:
    argv = _lower_type(sys.argv[1:] if argv is None else argv)
    cfg: ExportConfig = parse_config(
        ExportConfig, argv, "python -m mlx_lora.export", DESCRIPTION, EPILOG
    )
    result = export(cfg)
    if result.report is not None and not result.report.ok:
        print(
            "error: the export does not match the model (see the FAIL lines above)", file=sys.stderr
        )
        raise SystemExit(1)
    return result


if __name__ == "__main__":
    sys.exit(run(main))
