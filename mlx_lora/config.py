"""One dataclass per command; flags and ``--config FILE.yaml`` parse into it (flags win).

Flag names follow Hugging Face ``TrainingArguments`` / PEFT ``LoraConfig`` because the seed's users
know them; each field's ``help`` is the ``--help`` text, so the docs and the parser cannot drift.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, get_args, get_origin, get_type_hints

from mlx_lora.core.dtypes import DTYPES
from mlx_lora.core.errors import MlxLoraError
from mlx_lora.data.dataset import FORMATS
from mlx_lora.model.hub import DEFAULT_MODEL, SOURCES

# --optim: MLX's optimizers under HF's names (adamw_torch and adamw_hf are HF's spellings of adamw)
OPTIMIZERS = ("adamw", "adam", "sgd", "adafactor", "muon", "adamw_torch", "adamw_hf")
METHODS = ("sft", "dpo", "orpo", "simpo", "kto", "grpo")  # --method; sft is the default
NEEDS_REFERENCE = ("dpo", "kto")  # methods whose loss compares with a reference model


def opt(default: Any, help: str, **kw: Any) -> Any:
    """A config field with its ``--help`` text (and optional argparse extras)."""
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    model: str = opt(
        DEFAULT_MODEL,
        "base model: a local Hugging Face folder, a ModelScope/Hugging Face id, a .gguf file or "
        "ollama:NAME[:TAG] (converted once into a cached folder)",
    )
    data: str = opt(
        "dataset/huanhuan.json",
        "training data: .json array or .jsonl (alpaca, sharegpt, messages, completions or text "
        "records)",
    )
    output_dir: str = opt(
        "output", "where the adapter, checkpoints, trainer_state.json and loss.png go"
    )
    model_source: str = opt(
        "auto",
        "where a model id is fetched from (auto = cache, then ModelScope, then Hugging Face)",
        choices=list(SOURCES),
    )
    format: str = opt(
        "auto",
        "record format; auto detects it from the keys",
        choices=list(FORMATS),
    )
    system_prompt: str | None = opt(
        None,
        "system prompt for every example without one (recorded in the adapter; chat/serve/export "
        "reuse it). Default: the chat template's own",
    )
    max_seq_length: int = opt(
        2048, "longest example in tokens; longer ones are truncated and counted"
    )
    val_split: float = opt(0.0, "fraction of examples held out for eval_loss (seeded split)")
    eval_data: str | None = opt(
        None, "separate validation file (same formats); replaces --val-split"
    )
    num_train_epochs: float = opt(
        3.0, "epochs to train (fractions allowed); ignored when --max-steps is set"
    )
    max_steps: int = opt(-1, "optimizer steps to train; overrides --num-train-epochs when > 0")
    per_device_train_batch_size: int = opt(4, "examples per micro-batch")
    gradient_accumulation_steps: int = opt(
        4,
        "micro-batches per optimizer step (same update as one batch of batch×accumulation "
        "examples)",
    )
    learning_rate: float = opt(1e-4, "peak learning rate")
    optim: str = opt(
        "adamw",
        "optimizer (MLX's own; HF's adamw_torch/adamw_hf mean adamw); its state is checkpointed",
        choices=list(OPTIMIZERS),
    )
    weight_decay: float = opt(0.0, "decoupled weight decay (adamw, sgd, adafactor, muon)")
    lr_scheduler_type: str = opt(
        "linear", "learning-rate schedule after warmup", choices=["linear", "cosine", "constant"]
    )
    warmup_steps: int = opt(0, "steps of linear warmup from 0 to --learning-rate")
    max_grad_norm: float = opt(1.0, "clip the global gradient norm to this value (0 disables)")
    logging_steps: int = opt(10, "print a log line every N steps")
    save_steps: int = opt(100, "write checkpoint-N every N steps")
    save_total_limit: int | None = opt(
        None, "keep at most this many checkpoints (the best is never deleted)"
    )
    eval_steps: int | None = opt(
        None, "evaluate every N steps (default: --save-steps); needs --val-split"
    )
    early_stopping_patience: int | None = opt(
        None, "stop after this many evaluations without a lower eval_loss; the best adapter is kept"
    )
    gradient_checkpointing: bool | None = opt(
        None,
        "recompute activations in the backward pass to save memory: auto (default) = off when the "
        "run fits in memory without it, on otherwise; on; off",
        tristate=True,
    )
    packing: bool = opt(
        True,
        "pack a batch's examples into shared rows (block-diagonal attention: same loss, less "
        "padding)",
    )
    finetune_type: str = opt(
        "lora",
        "lora; dora (PEFT's use_dora: LoRA + learned row magnitudes); full (every weight, saved "
        "as a Hugging Face folder)",
        choices=["lora", "dora", "full"],
    )
    use_dora: bool = opt(False, "PEFT's name for --finetune-type dora")
    lora_r: int = opt(8, "LoRA rank")
    lora_alpha: float = opt(32.0, "LoRA alpha; the update is scaled by alpha / r")
    lora_dropout: float = opt(0.1, "dropout on the LoRA input during training")
    lora_layers: int | None = opt(
        None,
        "LoRA on the last N transformer blocks only (default: all); recorded as PEFT's "
        "layers_to_transform",
    )
    target_modules: str = opt(
        "q,k,v,o,gate,up,down",
        "comma-separated modules to adapt in every layer (q,k,v,o,gate,up,down or full names like "
        "q_proj)",
    )
    quantize: int | None = opt(
        None, "quantize the frozen base to 4 or 8 bits at load (QLoRA)", choices=[4, 8]
    )
    dtype: str = opt(
        "auto",
        "compute dtype; auto = bfloat16 on the GPU, float32 on the CPU",
        choices=["auto", *DTYPES],
    )
    seed: int = opt(42, "seed for the split, shuffling, LoRA init and dropout")
    resume: str | None = opt(
        None,
        "continue from the latest complete checkpoint in --output-dir, or from the checkpoint "
        "folder given",
        nargs="?",
        const="latest",
    )
    overwrite_output_dir: bool = opt(False, "start over even if --output-dir holds a run")
    allow_special_tokens_in_content: bool = opt(
        False,
        "parse special-token text inside records (e.g. <|im_end|>) as control tokens, as before; "
        "by default it is trained on as plain text and counted at start-up",
    )
    plot: bool = opt(True, "write loss.png")
    eval_at_end: bool = opt(
        False,
        "after training, compare base and tuned on the validation data and write eval.json, "
        "eval.md, eval.html (python -m mlx_lora.eval)",
    )
    report_to: str = opt(
        "none",
        "experiment trackers: none, all (every installed one) or a comma list of tensorboard, "
        'swanlab, wandb, mlflow (each an extra: pip install "mlx_lora[tensorboard]")',
    )
    run_name: str | None = opt(None, "the run's name in the trackers (default: date and time)")
    project_name: str | None = opt(None, "the trackers' project (default: mlx_lora)")
    force: bool = opt(
        False, "train even when the memory plan (python -m mlx_lora.plan) says it will not fit"
    )
    method: str = opt(
        "sft",
        "training objective: sft (next-token loss on the answers); dpo, orpo, simpo (preference "
        "pairs); kto (answers labelled good/bad); grpo (sampled answers scored by --reward)",
        choices=list(METHODS),
    )
    beta: float | None = opt(
        None,
        "TRL's beta: DPO/KTO temperature of the implicit reward, ORPO's odds-ratio weight, "
        "SimPO's reward scale, GRPO's KL weight (default 0.1; simpo 2.0; grpo 0.0)",
    )
    loss_type: str = opt(
        "sigmoid",
        "DPO loss: sigmoid (DPO), ipo (IPO, length-averaged log-probs as TRL), hinge (SLiC)",
        choices=["sigmoid", "ipo", "hinge"],
    )
    label_smoothing: float = opt(
        0.0, "DPO/SimPO: assumed probability that a pair's preference is flipped (cDPO)"
    )
    simpo_gamma: float = opt(0.5, "SimPO's target reward margin gamma")
    desirable_weight: float = opt(1.0, "KTO: weight of desirable (label true) examples")
    undesirable_weight: float = opt(1.0, "KTO: weight of undesirable (label false) examples")
    ref_adapter: str | None = opt(
        None,
        "DPO/KTO: start from this SFT adapter and use it as the reference (default: the base "
        "with the adapter off)",
    )
    num_generations: int = opt(4, "GRPO: answers sampled per prompt (the group)")
    max_completion_length: int = opt(64, "GRPO: most tokens per sampled answer")
    temperature: float = opt(1.0, "GRPO: sampling temperature of the group")
    epsilon: float = opt(0.2, "GRPO: clip range of the probability ratio")
    reward: str = opt(
        "format",
        "GRPO rewards, comma-separated: module:function (TRL's signature), or built-ins "
        "format (--reward-pattern), json, exact, numeric (against the record's answer column)",
    )
    reward_pattern: str = opt(
        r"^<think>.*?</think>\s*<answer>.*?</answer>$", "GRPO: the regex the format reward matches"
    )


def validate_train(cfg: TrainConfig) -> None:
    """Reject impossible numbers before anything is loaded (train, the memory plan, the studio):
    a zero batch would otherwise surface as a ZeroDivisionError, a negative length as a plan."""
    for ok, msg in _number_checks(cfg) + _combination_checks(cfg) + _method_checks(cfg):
        if not ok:
            raise MlxLoraError(msg)


def _positive(x: float) -> bool:
    return math.isfinite(x) and x > 0


def _number_checks(cfg: TrainConfig) -> list[tuple[bool, str]]:
    bs, acc = cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps
    return [
        (_positive(cfg.learning_rate), f"--learning-rate must be > 0, got {cfg.learning_rate}"),
        (bs > 0, f"--per-device-train-batch-size must be > 0, got {bs}"),
        (acc > 0, f"--gradient-accumulation-steps must be > 0, got {acc}"),
        (
            cfg.max_steps > 0 or _positive(cfg.num_train_epochs),
            f"--num-train-epochs must be > 0 (or set --max-steps), got {cfg.num_train_epochs}",
        ),
        (cfg.max_seq_length >= 2, f"--max-seq-length must be at least 2, got {cfg.max_seq_length}"),
        (0 <= cfg.val_split < 1, f"--val-split must be in [0, 1), got {cfg.val_split}"),
        (cfg.logging_steps > 0, f"--logging-steps must be > 0, got {cfg.logging_steps}"),
        (cfg.save_steps > 0, f"--save-steps must be > 0, got {cfg.save_steps}"),
        (
            cfg.eval_steps is None or cfg.eval_steps > 0,
            f"--eval-steps must be > 0, got {cfg.eval_steps}",
        ),
        (cfg.warmup_steps >= 0, f"--warmup-steps must be >= 0, got {cfg.warmup_steps}"),
        (cfg.lora_r > 0, f"--lora-r must be > 0, got {cfg.lora_r}"),
        (
            cfg.lora_layers is None or cfg.lora_layers > 0,
            f"--lora-layers must be > 0, got {cfg.lora_layers}",
        ),
        (_positive(cfg.lora_alpha), f"--lora-alpha must be > 0, got {cfg.lora_alpha}"),
        (0 <= cfg.lora_dropout < 1, f"--lora-dropout must be in [0, 1), got {cfg.lora_dropout}"),
        (
            math.isfinite(cfg.weight_decay) and cfg.weight_decay >= 0,
            f"--weight-decay must be >= 0, got {cfg.weight_decay}",
        ),
        (cfg.max_grad_norm >= 0, f"--max-grad-norm must be >= 0, got {cfg.max_grad_norm}"),
        (
            cfg.save_total_limit is None or cfg.save_total_limit > 0,
            f"--save-total-limit must be > 0, got {cfg.save_total_limit}",
        ),
    ]


def _combination_checks(cfg: TrainConfig) -> list[tuple[bool, str]]:
    targets = [t for t in cfg.target_modules.split(",") if t.strip()]
    return [
        (
            cfg.finetune_type == "full" or bool(targets),
            f"--target-modules names no module (got {cfg.target_modules!r}); e.g. q,k,v,o",
        ),
        (
            cfg.finetune_type != "full" or not cfg.quantize,
            "--finetune-type full trains every weight, so the base cannot be quantized; drop "
            "--quantize (or use --finetune-type lora for QLoRA)",
        ),
        (
            cfg.finetune_type != "full" or not cfg.eval_at_end,
            "--eval-at-end compares an adapter with its base; a full fine-tune has no adapter "
            "(export or chat with --model OUT)",
        ),
        (
            cfg.method != "grpo" or not cfg.eval_at_end,
            "--eval-at-end scores held-out answers; GRPO's data has prompts only (its eval is "
            "the mean reward: --eval-steps with --val-split or --eval-data)",
        ),
        (
            not cfg.eval_at_end or cfg.val_split > 0 or cfg.eval_data,
            "--eval-at-end needs validation data: set --val-split (e.g. 0.05) or --eval-data",
        ),
        (
            cfg.early_stopping_patience is None or cfg.val_split > 0 or cfg.eval_data,
            "--early-stopping-patience needs validation data: set --val-split (e.g. 0.05) or "
            "--eval-data",
        ),
    ]


def _method_checks(cfg: TrainConfig) -> list[tuple[bool, str]]:
    """The flags of ``--method`` that cannot work."""
    m = cfg.method
    return [
        (cfg.beta is None or cfg.beta > 0 or m == "grpo", f"--beta must be > 0, got {cfg.beta}"),
        (
            m == "sft" or cfg.finetune_type != "full",
            f"--method {m} needs an adapter (its reference is the base with it switched off); use "
            "--finetune-type lora or dora",
        ),
        (
            0 <= cfg.label_smoothing < 0.5,
            f"--label-smoothing must be in [0, 0.5), got {cfg.label_smoothing}",
        ),
        (
            cfg.loss_type == "sigmoid" or m == "dpo",
            f"--loss-type {cfg.loss_type} is a DPO loss; use --method dpo",
        ),
        (
            not cfg.ref_adapter or m in NEEDS_REFERENCE or m == "grpo",
            f"--ref-adapter is the reference of dpo, kto and grpo; --method {m} has none",
        ),
        (
            m != "grpo" or cfg.num_generations >= 2,
            f"--num-generations must be at least 2 (a group), got {cfg.num_generations}",
        ),
        (
            cfg.max_completion_length > 0,
            f"--max-completion-length must be > 0, got {cfg.max_completion_length}",
        ),
    ]


@dataclass
class ChatConfig:
    model: str | None = opt(
        None,
        "base model (id, folder, .gguf or ollama:NAME) or a fused folder; default: the adapter's "
        "recorded base",
    )
    adapter: str | None = opt(None, "adapter folder (a training --output-dir or checkpoint-N)")
    prompt: str | None = opt(None, "answer this one prompt and exit (otherwise: interactive)")
    system_prompt: str | None = opt(
        None, "system prompt; default: the one the adapter was trained with, else the template's"
    )
    max_tokens: int = opt(512, "most tokens to generate per answer")
    temperature: float | None = opt(
        None, "sampling temperature (0 = greedy); default from generation_config.json"
    )
    top_p: float | None = opt(None, "nucleus sampling; default from generation_config.json")
    top_k: int | None = opt(None, "top-k sampling; default from generation_config.json")
    min_p: float | None = opt(None, "min-p sampling; default from generation_config.json")
    repetition_penalty: float | None = opt(
        None, "penalty for repeated tokens; default from generation_config.json"
    )
    seed: int | None = opt(None, "sampling seed")
    model_source: str = opt("auto", "where a model id is fetched from", choices=list(SOURCES))
    allow_special_tokens_in_content: bool = opt(
        False,
        "let text you type such as <|im_end|> act as control tokens (turn boundaries); by default "
        "it is plain text",
    )


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


TRISTATE = {"auto": None, "on": True, "true": True, "yes": True, "off": False, "false": False}
TRISTATE |= {"no": False}


def tristate(value: Any) -> bool | None:
    """auto → None, on/true/yes → True, off/false/no → False (flags, YAML, Python callers)."""
    if value is None or isinstance(value, bool):
        return value
    key = str(value).strip().lower()
    if key not in TRISTATE:
        raise ValueError(f"expected auto, on or off, got {value!r}")
    return TRISTATE[key]


def _tristate_arg(value: str) -> bool | None:
    try:
        return tristate(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _base_type(tp: Any) -> Any:
    args = [a for a in get_args(tp) if a is not type(None)]
    return args[0] if get_origin(tp) is not None and args else tp


class _Parser(argparse.ArgumentParser):
    """A bad flag is a user error like any other: one line and exit 2, not the usage block."""

    def error(self, message: str) -> NoReturn:
        raise MlxLoraError(f"{message}; see {self.prog} --help")


def build_parser(
    cls: type, prog: str, description: str, epilog: str | None = None
) -> argparse.ArgumentParser:
    """argparse parser whose flags are the dataclass fields; defaults are suppressed, so what
    was given on the command line is known (flags win over the YAML file)."""
    parser = _Parser(
        prog=prog,
        description=description,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument(
        "--config",
        metavar="FILE.yaml",
        help="read options from a YAML file (keys = flag names); flags given here win",
    )
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        meta = dict(f.metadata)
        help_text = meta.pop("help", "") + (
            f" (default: {f.default})" if f.default not in (None, "") else ""
        )
        tp = _base_type(hints[f.name])
        if meta.pop("tristate", False):  # --flag [auto|on|off], --no-flag
            parser.add_argument(
                _flag(f.name),
                nargs="?",
                const=True,
                type=_tristate_arg,
                metavar="{auto,on,off}",
                help=help_text.replace(" (default: None)", ""),
            )
            parser.add_argument(
                "--no-" + _flag(f.name)[2:], dest=f.name, action="store_const", const=False
            )
        elif tp is bool:
            parser.add_argument(
                _flag(f.name), action=argparse.BooleanOptionalAction, help=help_text
            )
        else:
            parser.add_argument(
                _flag(f.name),
                type=tp,
                metavar=f.name.upper() if "choices" not in meta else None,
                help=help_text,
                **meta,
            )
    return parser


def _coerce(cls: type, key: str, value: Any, source: str) -> Any:
    hints = get_type_hints(cls)
    tp = _base_type(hints[key])
    if value is None:
        return None
    if next(f for f in dataclasses.fields(cls) if f.name == key).metadata.get("tristate"):
        try:
            return tristate(value)
        except ValueError as e:
            raise MlxLoraError(f"{source}: {key}: {e}") from None
    if tp is str and isinstance(value, list):  # target_modules: [q_proj, v_proj]
        return ",".join(str(v) for v in value)
    try:
        if tp is bool and not isinstance(value, bool):
            raise ValueError("expected true or false")
        return value if isinstance(value, tp) else tp(value)
    except (TypeError, ValueError) as e:
        raise MlxLoraError(
            f"{source}: {key}: {value!r} is not a valid {tp.__name__} ({e})"
        ) from None


def parse_config(
    cls: type, argv: list[str] | None, prog: str, description: str, epilog: str | None = None
) -> Any:
    """Defaults < YAML file < command-line flags."""
    return cls(**_given_values(cls, argv, prog, description, epilog))


def given_fields(cls: type, argv: list[str] | None, prog: str = "", description: str = "") -> set:
    """Names of the options set on the command line or in ``--config`` (not left at default)."""
    return set(_given_values(cls, argv, prog, description))


def _given_values(
    cls: type, argv: list[str] | None, prog: str, description: str, epilog: str | None = None
) -> dict[str, Any]:
    parser = build_parser(cls, prog, description, epilog)
    args = vars(parser.parse_args(sys.argv[1:] if argv is None else argv))
    values: dict[str, Any] = {}
    config_file = args.pop("config", None)
    if config_file:
        import yaml

        path = Path(config_file)
        if not path.is_file():
            raise MlxLoraError(f"config file {path} not found")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise MlxLoraError(f"{path}: invalid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(loaded, dict):
            raise MlxLoraError(f"{path}: expected a mapping of option names to values")
        names = {f.name for f in dataclasses.fields(cls)}
        for k, v in loaded.items():
            key = str(k).replace("-", "_")
            if key not in names:
                raise MlxLoraError(f"{path}: unknown option {k!r}; see --help for the names")
            values[key] = _coerce(cls, key, v, str(path))
    values.update(args)
    return values
