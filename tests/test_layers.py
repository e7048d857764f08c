"""Imports run one way: CLI -> recipes -> rollout / sync / data -> servers / gym -> config -> base.

Every module of the package is placed in a tier below; a module may import its own tier or lower
ones, never a higher one. A new module must be placed here (the test fails until it is), so the
direction is decided once, on purpose. Read from the source with `ast` (imports inside functions
count too), so nothing is imported to check it.
"""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "gymtrl"

# Lowest first. Keys are module names or package prefixes ("gymtrl.sync" covers gymtrl.sync.*);
# the longest matching key wins.
TIERS = [
    ("base", ["gymtrl", "gymtrl.errors", "gymtrl.atomic", "gymtrl.distributed", "gymtrl.failures", "gymtrl.net",
              "gymtrl.vllm_plugin.protocol"]),
    ("config", ["gymtrl.config"]),
    ("servers / gym", ["gymtrl.servers", "gymtrl.gym", "gymtrl.vllm_plugin", "gymtrl.envs", "gymtrl.models"]),
    ("rollout / sync / data", ["gymtrl.rollout", "gymtrl.sync", "gymtrl.data", "gymtrl.metrics", "gymtrl.rewards",
                               "gymtrl.checkpoints"]),
    ("recipes", ["gymtrl.train", "gymtrl.trl_seam", "gymtrl.serve", "gymtrl.prepare", "gymtrl.evaluation",
                 "gymtrl.doctor", "gymtrl.plots"]),
    ("cli", ["gymtrl.cli", "gymtrl.models.cli"]),
]


def tier_of(module: str) -> int:
    best, tier = "", None
    for i, (_, keys) in enumerate(TIERS):
        for key in keys:
            if (module == key or module.startswith(key + ".")) and len(key) > len(best):
                best, tier = key, i
    assert tier is not None, f"{module} is in no tier of tests/test_layers.py: place it there"
    return tier


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported(path: Path) -> set[str]:
    """The gymtrl modules `path` imports (relative imports resolved)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            candidates = [target] + [f"{target}.{a.name}" for a in node.names]
            # "from gymtrl.sync import nccl" imports the module gymtrl.sync.nccl
            out.add(next((c for c in reversed(candidates) if (SRC.parent / (c.replace(".", "/") + ".py")).exists()),
                         target))
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return {m for m in out if m == "gymtrl" or m.startswith("gymtrl.")}


def test_no_import_runs_up_the_layers():
    wrong = []
    for path in sorted(SRC.rglob("*.py")):
        if "resources_servers" in path.parts:  # NeMo Gym servers: run in Gym's venv, import no gymtrl
            continue
        here = module_name(path)
        for target in imported(path):
            if tier_of(target) > tier_of(here):
                wrong.append(f"{here} ({TIERS[tier_of(here)][0]}) imports {target} ({TIERS[tier_of(target)][0]})")
    assert not wrong, "imports that run up the layers:\n" + "\n".join(wrong)


def test_the_check_can_fail():
    """Not blind: an import of the CLI from the base tier is seen as wrong."""
    assert tier_of("gymtrl.cli") > tier_of("gymtrl.errors")
    assert tier_of("gymtrl.sync.publisher") > tier_of("gymtrl.servers.vllm_control")
    assert tier_of("gymtrl.models.cli") > tier_of("gymtrl.models.fetch")
