"""The shape of the code: one home per piece of logic, data flowing one way, a readable tree.

Three guards, each shown able to fail (the ``test_*_catches_*`` tests plant a violation in a copy
of a real module and check that the guard names it):

- **One home.** Each rule names a piece of logic, the one file (by path from the repository root)
  that owns it, and what the logic looks like in the syntax tree: a call (``os.replace(…)``), a
  string constant (``"generation_config.json"``, also when built as ``"a" + "b"`` or in an
  f-string), or a literal collection holding given strings. Docstrings and comments may mention
  anything. Checked over ``mlx_lora/`` and ``scripts/``.
- **Layers.** The import graph of the package, function-level imports included, has no cycle, and
  no module imports from a higher level (``LEVELS``).
- **The tree.** At most 8 modules directly in ``mlx_lora/``; every module has a line in the
  README's Architecture section; no function over 80 lines.
"""

from __future__ import annotations

import ast
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "mlx_lora"

# mlx_lora/testing/ builds test material (HF folders, tokenizers, caches of fetched files) byte by
# byte on purpose, independently of the code under test, so the one-home rules do not apply to it.
INDEPENDENT = ("mlx_lora/testing/",)
# The benchmark runs the peers (mlx-lm, the seed's transformers + PEFT) their own way, some of it
# in the peers' interpreters, where mlx_lora is not installed.
PEER_BENCH = "scripts/bench_train.py"


@dataclass(frozen=True)
class Rule:
    what: str
    owners: tuple[str, ...]  # paths from the repository root
    calls: tuple[str, ...] = ()  # dotted call names; a leading "." matches any receiver
    strings: tuple[str, ...] = ()  # string constants containing one of these
    exact: tuple[str, ...] = ()  # string constants equal to one of these
    together: tuple[str, ...] = ()  # a literal tuple/list/set/dict holding all of these strings
    call_args: tuple[tuple[str, str], ...] = ()  # (call name, first argument constant)
    allowed: tuple[str, ...] = field(default=())  # other files, each for a stated reason


RULES = [
    Rule(
        "safetensors headers", ("mlx_lora/core/weights.py",), calls=("struct.unpack", "safe_open")
    ),
    Rule(
        "safetensors data",
        ("mlx_lora/core/weights.py",),
        calls=("mx.load", "mx.save_safetensors", "save_file", "load_file"),
        allowed=(PEER_BENCH,),
    ),
    Rule("shard index", ("mlx_lora/core/weights.py",), strings=("model.safetensors.index.json",)),
    Rule(
        "PEFT tensor prefix",
        ("mlx_lora/model/lora.py",),
        strings=("base_model.model.",),
        allowed=(PEER_BENCH,),
    ),
    Rule(
        "temp-and-rename",
        ("mlx_lora/core/files.py",),
        calls=("os.replace", "os.rename", "tempfile.mkstemp", "tempfile.mkdtemp", ".rename"),
        strings=(".tmp-",),
        allowed=(
            "scripts/studio_screenshots.py",  # a throw-away browser profile, not a result file
            "scripts/profile_train.py",  # a throw-away profile cache
        ),
    ),
    Rule(
        "reading JSON files",
        ("mlx_lora/core/files.py",),
        calls=("json.loads(.read_text)", "json.load(open)"),
        # bench_preference's mlx-lm-lora worker runs in that tool's own venv, without mlx_lora
        allowed=(PEER_BENCH, "scripts/bench_preference.py"),
    ),
    Rule(
        "Jinja rendering",
        ("mlx_lora/model/prompt.py",),
        calls=(".render_jinja_template", ".apply_chat_template", "render_jinja_template"),
        allowed=("scripts/bench_encoder.py", PEER_BENCH),  # they measure the peers' own way
    ),
    Rule(
        "loading a tokenizer",
        ("mlx_lora/model/prompt.py",),
        calls=("AutoTokenizer.from_pretrained",),
        allowed=("scripts/bench_encoder.py", PEER_BENCH),  # the peers' own tokenizer loading
    ),
    Rule("do_sample rule", ("mlx_lora/model/meta.py",), exact=("do_sample",)),
    Rule(
        "training system prompt record",
        ("mlx_lora/model/meta.py",),
        exact=("mlx_lora.json",),
        call_args=((".get", "system_prompt"),),
        # the studio's form and API have a field of that name (what the user typed, not a record)
        allowed=("mlx_lora/studio/chatting.py", "mlx_lora/studio/server.py"),
    ),
    Rule("generation_config.json", ("mlx_lora/model/meta.py",), exact=("generation_config.json",)),
    Rule("model sources", ("mlx_lora/model/hub.py",), together=("modelscope", "huggingface")),
    Rule("llama.cpp loading", ("mlx_lora/gguf/llamacpp.py",), calls=("llama_cpp.Llama", "Llama")),
    Rule("dtype table", ("mlx_lora/core/dtypes.py",), together=("bfloat16", "float16")),
    Rule("config dtype key", ("mlx_lora/core/dtypes.py",), exact=("torch_dtype",)),
    Rule("GGUF type table", ("mlx_lora/gguf/writer.py",), together=("q4_0", "q4_k_m")),
    Rule("end-of-turn tokens", ("mlx_lora/model/meta.py",), together=("<|im_end|>", "<|eot_id|>")),
    Rule("byte sizes for people", ("mlx_lora/core/units.py",), calls=("human_bytes_def",)),
]


# ---------------------------------------------------------------- one home


def _name(node: ast.AST) -> str:
    """``a.b.c`` for a Name/Attribute chain, ``.c`` when the receiver is anything else."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return "." + ".".join(reversed(parts))


def _const_str(node: ast.AST) -> str | None:
    """A string the expression always is (constants, ``+`` of constants), or the f-string's text."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        a, b = _const_str(node.left), _const_str(node.right)
        return a + b if a is not None and b is not None else None
    if isinstance(node, ast.JoinedStr):
        return "".join(v.value for v in node.values if isinstance(v, ast.Constant))
    return None


def _docstrings(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr):
            if isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
                ids.add(id(body[0].value))
    return ids


def _call_matches(call: ast.Call, pattern: str) -> bool:
    name, _, inner = pattern.partition("(")
    got = _name(call.func)
    if name.startswith("."):
        ok = got.endswith(name)
    else:
        ok = got == name or got.endswith("." + name) and "." not in name
    if not ok:
        return False
    if not inner:
        return True
    inner = inner.rstrip(")")
    arg = call.args[0] if call.args else None
    return isinstance(arg, ast.Call) and _call_matches(arg, inner)


BYTE_SCALES = {1e3, 1e6, 1e9, 1024, 2**20, 2**30}


def _defines(tree: ast.AST) -> set[str]:
    """Functions that format byte counts for people: they return a size divided by a byte scale
    with its unit (the one home is core/units.py)."""
    out = set()
    for fn in ast.walk(tree):
        if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        for node in ast.walk(fn):
            if not isinstance(node, ast.Return) or node.value is None:
                continue
            divides = any(
                isinstance(n, ast.BinOp | ast.AugAssign)
                and isinstance(n.op, ast.Div)
                and isinstance(
                    v := (n.right if isinstance(n, ast.BinOp) else n.value), ast.Constant
                )
                and v.value in BYTE_SCALES
                for n in ast.walk(node)
            )
            units = any(
                re.search(r"(^|[^A-Za-z])(GB|MB|KB|GiB|MiB)\b", s)
                for n in ast.walk(node)
                if (s := _const_str(n)) is not None
            )
            if divides and units:
                out.add(fn.name)
    return out


def violations(source: str, rule: Rule) -> list[str]:
    """What in ``source`` looks like ``rule``'s logic (line numbers and a few words)."""
    tree = ast.parse(source)
    skip = _docstrings(tree)
    found = []
    if "human_bytes_def" in rule.calls:
        found += [f"def {n}" for n in sorted(_defines(tree))]
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            found += [
                f"{node.lineno}: call {p}"
                for p in rule.calls
                if p != "human_bytes_def" and _call_matches(node, p)
            ]
            for fn, arg in rule.call_args:
                if node.args and _call_matches(node, fn) and _const_str(node.args[0]) == arg:
                    found.append(f"{node.lineno}: {fn}({arg!r})")
        if isinstance(node, ast.Tuple | ast.List | ast.Set | ast.Dict) and rule.together:
            items = node.keys if isinstance(node, ast.Dict) else node.elts
            values = {_const_str(k) for k in items if k is not None}
            if all(t in values for t in rule.together):
                found.append(f"{node.lineno}: a literal holding {', '.join(rule.together)}")
        if id(node) in skip or not isinstance(node, ast.Constant | ast.BinOp | ast.JoinedStr):
            continue
        text = _const_str(node)
        if text is None:
            continue
        if any(s in text for s in rule.strings) or text in rule.exact:
            found.append(f"{node.lineno}: {text[:40]!r}")
    return sorted(set(found))


def _sources() -> list[Path]:
    files = sorted(PACKAGE.rglob("*.py")) + sorted((REPO / "scripts").glob("*.py"))
    return [p for p in files if not str(p.relative_to(REPO)).startswith(INDEPENDENT)]


@pytest.mark.parametrize("rule", RULES, ids=[r.what for r in RULES])
def test_logic_has_one_home(rule: Rule) -> None:
    offenders = {}
    for p in _sources():
        rel = str(p.relative_to(REPO))
        if rel in rule.owners or rel in rule.allowed:
            continue
        if found := violations(p.read_text(encoding="utf-8"), rule):
            offenders[rel] = found
    assert not offenders, f"{rule.what} belongs in {', '.join(rule.owners)}; found {offenders}"


def test_every_owner_exists_and_holds_its_logic() -> None:
    """A rule whose owner moved or never matches guards nothing."""
    for rule in RULES:
        for owner in rule.owners:
            path = REPO / owner
            assert path.is_file(), f"{rule.what}: owner {owner} is missing"
            assert violations(path.read_text(encoding="utf-8"), rule), (
                f"{rule.what}: nothing in its owner {owner} matches the rule; fix the rule"
            )


# A violation of each rule, as code someone might paste into another module.
PLANTED = {
    "safetensors headers": "def f(b):\n    return struct.unpack('<Q', b[:8])\n",
    "safetensors data": "def f(p):\n    return mx.load(str(p))\n",
    "shard index": "INDEX = 'model.safetensors' + '.index.json'\n",
    "PEFT tensor prefix": "P = 'base_model' + '.model.'\n",
    "temp-and-rename": "def f(a, b):\n    os.rename(a, b)\n",
    "reading JSON files": "def f(p):\n    return json.loads(p.read_text())\n",
    "Jinja rendering": "def f(t, m):\n    return t.apply_chat_template(m, tokenize=False)\n",
    "loading a tokenizer": "def f(p):\n    return AutoTokenizer.from_pretrained(p)\n",
    "do_sample rule": "def f(g):\n    return g.get('do_sample', True)\n",
    "training system prompt record": "def f(d):\n    return d.get('system_prompt')\n",
    "generation_config.json": "NAME = f'generation_config.json'\n",
    "model sources": "SOURCES = ('modelscope','huggingface')\n",
    "llama.cpp loading": "def f(p):\n    return llama_cpp.Llama(model_path=p)\n",
    "dtype table": "D = {'float32': 4, 'bfloat16': 2, 'float16': 2}\n",
    "config dtype key": "def f(c):\n    return c.get('torch_dtype') or c.get('dtype')\n",
    "GGUF type table": "TYPES = ['f16', 'q8_0', 'q4_0', 'q4_k_m']\n",
    "end-of-turn tokens": "ENDS = ('<|im_end|>', '<|eot_id|>', '<|end|>')\n",
    "byte sizes for people": "def size(n):\n    return f'{n / 1e9:.1f} GB'\n",
}


def test_every_rule_has_a_planted_violation() -> None:
    assert set(PLANTED) == {r.what for r in RULES}


@pytest.mark.parametrize("rule", RULES, ids=[r.what for r in RULES])
def test_one_home_catches_a_planted_violation(rule: Rule, tmp_path: Path) -> None:
    """The rule flags its violation appended to a copy of a real module that is not its owner,
    including a copy named like the owner in another folder (owners are paths, not basenames)."""
    host = REPO / "mlx_lora" / "infer" / "serve.py"
    assert not violations(host.read_text(encoding="utf-8"), rule)
    for name in ("serve.py", Path(rule.owners[0]).name):
        copy = tmp_path / "studio" / name
        copy.parent.mkdir(exist_ok=True)
        shutil.copy(host, copy)
        with copy.open("a", encoding="utf-8") as f:
            f.write("\n\n" + PLANTED[rule.what])
        rel = f"mlx_lora/studio/{name}"
        assert rel not in rule.owners
        assert violations(copy.read_text(encoding="utf-8"), rule), f"{rule.what} missed in {rel}"


def test_prose_may_mention_anything() -> None:
    text = '"""Reads generation_config.json and do_sample; os.replace(a, b)."""\n# mx.load(x)\n'
    assert not any(violations(text, r) for r in RULES)


# ---------------------------------------------------------------- layers

# Level of each stage (a subpackage, or a module directly in mlx_lora/). A module imports only
# from its own level or below; within a level, imports may go sideways as long as the module
# graph stays acyclic. Commands (every __main__.py and the thin command modules) are on top.
LEVELS: dict[str, int] = {
    "mlx_lora": 0,
    "core": 0,
    "model": 1,
    "data": 2,
    "config": 2,
    "gguf": 3,
    "infer": 3,
    "plan": 4,
    "train": 4,
    "eval": 4,
    "ollama": 5,
    "verify": 5,
    "export": 5,
    "studio": 6,
    "testing": 6,
    "demo": 7,
    "chat": 7,
    "serve": 7,
    "fuse": 7,
    "__main__": 7,
}
COMMAND_LEVEL = 7


def module_name(path: Path, root: Path = REPO) -> str:
    return ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")


def import_graph(root: Path = REPO) -> dict[str, set[str]]:
    """module → the package modules it imports anywhere (top level or inside functions)."""
    paths = {module_name(p, root): p for p in (root / "mlx_lora").rglob("*.py")}
    graph = {}
    for name, path in paths.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level:
                raise AssertionError(f"{name}: relative import; write mlx_lora.… in full")
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            deps |= {t for t in targets if t in paths and t != name}
        graph[name] = deps
    return graph


def level(module: str) -> int:
    parts = module.split(".")
    if parts[-1] == "__main__":
        return COMMAND_LEVEL
    return LEVELS[parts[1] if len(parts) > 1 else parts[0]]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    state: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(u: str) -> None:
        state[u] = 1
        stack.append(u)
        for v in sorted(graph[u]):
            if state.get(v) == 1:
                found.append(stack[stack.index(v) :] + [v])
            elif v not in state:
                visit(v)
        stack.pop()
        state[u] = 2

    for u in sorted(graph):
        if u not in state:
            visit(u)
    return found


def upward(graph: dict[str, set[str]]) -> list[str]:
    return sorted(
        f"{u} (level {level(u)}) imports {v} (level {level(v)})"
        for u, vs in graph.items()
        for v in vs
        if level(v) > level(u)
    )


def test_every_stage_has_a_level() -> None:
    stages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    stages |= {p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    assert stages <= set(LEVELS), f"give these a level in LEVELS: {sorted(stages - set(LEVELS))}"


def test_imports_have_no_cycle() -> None:
    assert not cycles(import_graph()), cycles(import_graph())


def test_imports_go_downward_only() -> None:
    assert not upward(import_graph())


def test_layer_guard_catches_an_upward_import_and_a_cycle(tmp_path: Path) -> None:
    """Plant a function-level import of the export stage in core/files.py: an upward edge and,
    since export imports files, a cycle."""
    shutil.copytree(PACKAGE, tmp_path / "mlx_lora", ignore=shutil.ignore_patterns("static"))
    target = tmp_path / "mlx_lora" / "core" / "files.py"
    with target.open("a", encoding="utf-8") as f:
        f.write("\n\ndef _late():\n    from mlx_lora.export.pipeline import export\n")
    graph = import_graph(tmp_path)
    assert any("mlx_lora.core.files (level 0) imports mlx_lora.export" in e for e in upward(graph))
    assert any(c[0] == "mlx_lora.core.files" or "mlx_lora.core.files" in c for c in cycles(graph))


def late_imports(source: str) -> list[str]:
    """Imports of the package inside functions. Allowed only for optional or heavy third-party
    dependencies (llama_cpp, trackers, selenium, …): inside the package they would only hide
    an order the layers should make plain."""
    out = []
    for fn in ast.walk(ast.parse(source)):
        if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
            for node in ast.walk(fn):
                names = []
                if isinstance(node, ast.ImportFrom) and node.module:
                    names = [node.module]
                elif isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                out += [f"{fn.name}: {n}" for n in names if n.split(".")[0] == "mlx_lora"]
    return out


def test_package_imports_are_at_module_level() -> None:
    found = {
        str(p.relative_to(REPO)): late
        for p in sorted(PACKAGE.rglob("*.py"))
        if (late := late_imports(p.read_text(encoding="utf-8")))
    }
    assert not found, found


def test_late_import_guard_catches_one() -> None:
    host = (PACKAGE / "infer" / "serve.py").read_text(encoding="utf-8")
    assert not late_imports(host)
    planted = host + "\n\ndef _late():\n    from mlx_lora.model import hub\n\n    return hub\n"
    assert late_imports(planted) == ["_late: mlx_lora.model"]


# ---------------------------------------------------------------- the tree


def test_few_modules_at_the_top() -> None:
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= 8, f"{len(top)} modules directly in mlx_lora/: {top}"


def _architecture_section() -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    start = text.index("### Architecture")
    end = text.find("\n### ", start + 1)
    return text[start : end if end > 0 else len(text)]


def test_readme_lists_every_module() -> None:
    section = _architecture_section()
    missing = [
        str(p.relative_to(PACKAGE))
        for p in sorted(PACKAGE.rglob("*.py"))
        if p.name != "__init__.py" and f"`{p.relative_to(PACKAGE)}`" not in section
    ]
    assert not missing, f"README Architecture has no line for: {missing}"


def test_functions_stay_short() -> None:
    """No function over 80 lines: a long one is a stage that wants its own function."""
    long = []
    for p in sorted(PACKAGE.rglob("*.py")):
        for f in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            if isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef):
                n = f.end_lineno - f.lineno + 1
                if n > 80:
                    long.append(f"{p.relative_to(REPO)}:{f.name} ({n} lines)")
    assert not long, long
