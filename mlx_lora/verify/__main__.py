"""``python -m mlx_lora.verify`` and ``mlx-lora verify``: flags → config →
:mod:`mlx_lora.verify.checks`."""

from __future__ import annotations

import sys
from pathlib import Path

from mlx_lora.config import parse_config
from mlx_lora.core.cli import run
from mlx_lora.core.errors import MlxLoraError
from mlx_lora.gguf.llamacpp import INSTALL_HINT
from mlx_lora.verify.checks import Report, VerifyConfig, verify_export, verify_gguf

DESCRIPTION = """Check that a GGUF export is the model you trained: GGUF metadata vs the HF folder,
tokenization and next-token logits vs MLX in llama.cpp (needs llama-cpp-python), fused vs
base+adapter.
Exits 1 when a check fails."""

EPILOG = f"""examples:
  python -m mlx_lora.verify --export-dir export/huanhuan
  python -m mlx_lora.verify --gguf m.gguf --hf-dir fused/ --adapter output/

llama.cpp checks need: {INSTALL_HINT}"""


def main(argv: list[str] | None = None) -> Report:
    c: VerifyConfig = parse_config(
        VerifyConfig, argv, "python -m mlx_lora.verify", DESCRIPTION, EPILOG
    )
    if c.export_dir:
        report = verify_export(
            Path(c.export_dir), eval_data=Path(c.eval_data) if c.eval_data else None
        )
    elif c.gguf and c.hf_dir:
        report = verify_gguf(
            Path(c.hf_dir),
            Path(c.gguf),
            adapter_dir=Path(c.adapter) if c.adapter else None,
            base_dir=Path(c.base) if c.base else None,
            gguf_type=c.gguf_type,
            lora_gguf=Path(c.lora_gguf) if c.lora_gguf else None,
            modelfile=Path(c.modelfile) if c.modelfile else None,
            eval_data=Path(c.eval_data) if c.eval_data else None,
        )
    else:
        raise MlxLoraError("pass --export-dir OUT, or --gguf FILE with --hf-dir DIR")
    print(report.table())
    if not report.ok:
        raise SystemExit(1)
    return report


if __name__ == "__main__":
    sys.exit(run(main))
