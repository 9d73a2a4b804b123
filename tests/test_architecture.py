"""One place for each piece of logic: the worst duplicates of the past stay gone.

Each rule names a piece of logic, the one module that owns it, and a pattern that only that module
may contain. A new feature that needs the logic calls the owner instead of writing it again.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mlx_lora"

# (what, pattern, modules allowed to contain it)
RULES = [
    ("safetensors headers", r"struct\.unpack|safe_open\(", {"weights.py"}),
    ("safetensors data", r"\bmx\.load\(|save_safetensors\(", {"weights.py"}),
    ("shard index", r"model\.safetensors\.index\.json", {"weights.py"}),
    ("PEFT tensor prefix", r"base_model\.model\.", {"lora.py"}),
    ("temp-and-rename", r"os\.replace\(|mkstemp\(|\.tmp-", {"files.py"}),
    ("reading JSON files", r"json\.loads\([^)]*read_text", {"files.py"}),
    ("Jinja rendering", r"render_jinja_template|apply_chat_template\(", {"prompt.py"}),
    ("loading a tokenizer", r"AutoTokenizer\.from_pretrained", {"prompt.py"}),
    ("do_sample rule", r"do_sample", {"meta.py"}),
    ("training system prompt record", r'get\("system_prompt"\)|"mlx_lora\.json"', {"meta.py"}),
    ("generation_config.json", r"generation_config\.json\"", {"meta.py"}),
    ("model sources", r'"modelscope", "huggingface"', {"hub.py"}),
    ("llama.cpp loading", r"llama_cpp\.Llama\(", {"llamacpp.py"}),
]


def _code(path: Path) -> str:
    """The module without docstrings and comments (prose may mention anything)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr):
            if isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
                body[0].value.value = ""
    return ast.unparse(tree)


@pytest.mark.parametrize("what,pattern,owners", RULES, ids=[r[0] for r in RULES])
def test_logic_has_one_home(what: str, pattern: str, owners: set[str]) -> None:
    offenders = [
        p.name
        for p in sorted(PACKAGE.rglob("*.py"))
        if p.name not in owners and re.search(pattern, _code(p))
    ]
    assert not offenders, f"{what} belongs in {', '.join(sorted(owners))}, found in {offenders}"


def test_functions_stay_short() -> None:
    """No function over 80 lines: a long one is a stage that wants its own function."""
    long = []
    for p in sorted(PACKAGE.rglob("*.py")):
        for f in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            if isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef):
                n = f.end_lineno - f.lineno + 1
                if n > 80:
                    long.append(f"{p.name}:{f.name} ({n} lines)")
    assert not long, long
