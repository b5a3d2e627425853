"""Plant one-line bugs in a copy of the package, one at a time, and check that the tests meant to see each go red.

Each mutation replaces one line of ``custom_components`` (the text must occur exactly once, so a refactor that moves
it makes the check fail loudly instead of passing silently) in a temporary copy of the repository, runs the named test
files there with ``pytest -x -n 0``, and records whether they failed. The repository itself is never edited.

Example::

    python scripts/mutation_check.py                  # all mutations
    python scripts/mutation_check.py --only "['bn_freeze']"

Exit status 1 if a mutation survives (its tests stay green) or cannot be applied.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]


class Mutation(NamedTuple):
    file: str  # inside custom_components/
    old: str  # the exact text, found once
    new: str
    tests: tuple[str, ...]
    what: str


MUTATIONS: dict[str, Mutation] = {
    "critic_steps_resume": Mutation(
        "engines/trainer.py", "        self.state.critic_steps = int(critic_steps)\n",
        "        self.state.critic_steps = 0\n",
        ("tests/custom_components/test_trainer.py",),
        "a resumed run restarts the lazy penalty's critic-step count (resume not exact)"),
    "bn_freeze": Mutation(
        "engines/gan_steps.py", "        m.momentum = 0.0\n", "        pass\n",
        ("tests/custom_components/test_networks_critic.py", "tests/custom_components/test_trainer.py"),
        "G's step moves a 'frozen' batch-norm critic's running statistics"),
    "attention_sign": Mutation(
        "losses/synthesis.py", "    weight = (1.0 - confidence.detach()).clamp(min=0.0) ** beta\n",
        "    weight = confidence.detach().clamp(min=0.0) ** beta\n",
        ("tests/custom_components/test_losses.py",),
        "F = M^beta instead of (1 - M)^beta: the attention favours the convincing regions (Eq. 6)"),
    "penalty_dropped": Mutation(
        "engines/penalty.py", "        update.loss = update.loss + self.interval * gp\n",
        "        update.loss = update.loss\n",
        ("tests/custom_components/test_handlers.py", "tests/custom_components/test_trainer.py"),
        "the gradient penalty is reported but not added to the critic's loss (Eq. 2)"),
    "adv_local_target": Mutation(
        "engines/gan_steps.py",
        "                loss_adv_local = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))  # Eq. 5\n",
        "                loss_adv_local = F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits))  # Eq. 5\n",
        ("tests/custom_components/test_trainer.py",),
        "G is trained to look fake to D2 (Eq. 5's target flipped)"),
    "confidence_not_detached": Mutation(
        "losses/synthesis.py", "    return torch.sigmoid(logits.detach().float())\n",
        "    return torch.sigmoid(logits.float())\n",
        ("tests/custom_components/test_losses.py", "tests/custom_components/test_trainer.py"),
        "M is not detached: the voxel loss pushes gradients into D2"),
}


def _copy(dest: Path) -> None:
    def ignore(folder: str, names: list[str]) -> set[str]:  # caches, and the bundle's own run outputs
        skip = {"__pycache__"} | ({"runs", "eval", "inference"} if Path(folder) == ROOT / "bundle" else set())
        return skip & set(names)

    for name in ("custom_components", "tests", "bundle", "scripts"):
        shutil.copytree(ROOT / name, dest / name, ignore=ignore)
    for name in ("setup.cfg", "README.md"):
        shutil.copy2(ROOT / name, dest / name)


def run_one(name: str, mutation: Mutation, python: str = sys.executable) -> dict:
    """Apply ``mutation`` in a temporary copy and run its tests; ``{"name", "red", "seconds", "summary"}``."""
    with tempfile.TemporaryDirectory(prefix=f"mutation_{name}_") as tmp:
        dest = Path(tmp)
        _copy(dest)
        target = dest / "custom_components" / mutation.file
        text = target.read_text()
        count = text.count(mutation.old)
        if count != 1:
            return {"name": name, "red": False, "seconds": 0.0,
                    "summary": f"cannot apply: the line occurs {count} times in custom_components/{mutation.file}"}
        target.write_text(text.replace(mutation.old, mutation.new))
        start = time.perf_counter()
        proc = subprocess.run([python, "-m", "pytest", "-x", "-q", "-n", "0", "-p", "no:cacheprovider",
                               *mutation.tests], cwd=dest, capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(dest)})
        lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
        failed = [ln for ln in lines if ln.startswith("FAILED")]
        return {"name": name, "red": proc.returncode == 1, "seconds": round(time.perf_counter() - start, 1),
                "summary": (failed[0] if failed else "") + (" | " if failed else "") + (lines[-1] if lines else "")}


def main(only: list | tuple | None = None, output: str | None = None) -> int:
    chosen = list(MUTATIONS) if not only else [only] if isinstance(only, str) else list(only)
    unknown = [n for n in chosen if n not in MUTATIONS]
    if unknown:
        raise ValueError(f"unknown mutation(s) {unknown}; known: {list(MUTATIONS)}")
    results = []
    for name in chosen:
        r = run_one(name, MUTATIONS[name])
        results.append(r)
        print(f"{'RED  ' if r['red'] else 'GREEN'} {name} ({MUTATIONS[name].what}; {r['seconds']} s): {r['summary']}",
              flush=True)
    if output:
        Path(output).write_text(json.dumps(results, indent=2))
    survivors = [r["name"] for r in results if not r["red"]]
    print(f"{len(results) - len(survivors)} of {len(results)} mutations turned their tests red"
          + (f"; survived: {survivors}" if survivors else ""))
    return 1 if survivors else 0


if __name__ == "__main__":
    import fire

    sys.exit(fire.Fire(main))
