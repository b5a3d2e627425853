"""Every combination of configs users pass resolves, in a fresh interpreter, every component and name it uses.

An overlay's ``imports`` list replaces train.json's (MONAI merges configs key by key), so an overlay that did not
repeat ``$import custom_components.utils.tracking`` once broke training with ``module 'custom_components' has no attribute
'tracking'`` (train.json + mrct.json, train.json + multi_gpu_train.json); the package now loads its sub-modules on
access. Here each combination is merged as ``monai.bundle`` merges it, in a process of its own (forked from one
that has imported only torch and MONAI, so nothing imported by pytest or by another combination can hide a missing
import), and then:

* every import statement of the config is run, as MONAI runs them before the first item it resolves;
* every name a ``$`` expression reads (``os.path.join``, ``custom_components.engines.distributed.local_device``) resolves
  in the namespace those imports build, attribute by attribute, without evaluating the expression (checked before
  any ``_target_`` is imported, so only the imports and the package's lazy sub-modules can resolve it);
* every ``_target_`` is located as MONAI locates it, and the component's arguments bind to its signature.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "bundle" / "configs"
#: what users pass to ``--config_file``: train.json alone or under one overlay, and inference.json alone
COMBINATIONS = [("train.json",), *[("train.json", overlay) for overlay in (
    "paper.json", "3d.json", "mrct.json", "multi_gpu_train.json", "evaluate.json")], ("inference.json",)]
NOT_CONFIGS = {"metadata.json", "mlflow_settings.json"}  # read by --meta_file and --tracking, never merged


def unresolved(files: list[str]) -> list[str]:
    """What the merged ``files`` name that does not resolve (run in a fresh process by the tests below)."""
    import ast
    import builtins
    import inspect
    import re
    from pydoc import locate

    from monai.bundle import ConfigParser
    from monai.bundle.config_item import ComponentLocator, ConfigComponent, ConfigExpression

    parser = ConfigParser()
    parser.read_config(files)
    nodes = list(_walk(parser.get()))
    problems = []
    for where, node in nodes:
        if ConfigExpression.is_import_statement(node):
            try:
                ConfigExpression(node, globals=parser.globals).evaluate()
            except ImportError as e:
                problems.append(f"{where}: {node}: {e}")
    for where, node in nodes:  # first, as no _target_ has been imported yet when MONAI evaluates one
        if ConfigExpression.is_expression(node) and not ConfigExpression.is_import_statement(node):
            code = re.sub(r"@\w+(?:#\w+)*", "_ref", node[1:])  # references are values, not names
            for chain in _read_names(ast.parse(code, mode="eval")):
                missing = object()
                obj, depth = parser.globals.get(chain[0], getattr(builtins, chain[0], missing)), 1
                while obj is not missing and depth < len(chain):
                    obj, depth = getattr(obj, chain[depth], missing), depth + 1
                if obj is missing:
                    problems.append(f"{where}: {node}: {'.'.join(chain[:depth])} does not resolve")
    locator = ComponentLocator()
    for where, node in nodes:
        if isinstance(node, dict) and "_target_" in node:
            name = ConfigComponent(node, locator=locator, id=where).resolve_module_name()
            target = locate(name) if isinstance(name, str) else name
            if target is None:
                problems.append(f"{where}: _target_ {node['_target_']!r} is not found")
                continue
            arguments = {k: None for k in node if not k.startswith("_")}
            try:
                inspect.signature(target).bind_partial(**arguments)
            except TypeError as e:
                problems.append(f"{where}: {node['_target_']}({', '.join(arguments)}): {e}")
            except ValueError:  # a builtin without a signature: nothing to check
                pass
    return problems


def _walk(node, path=()):
    """(id, node) of every dict, list item and leaf of a config."""
    yield "#".join(path), node
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for k, v in items:
        yield from _walk(v, (*path, str(k)))


def _read_names(tree) -> list[list[str]]:
    """The dotted names (``['os', 'path', 'join']``) an expression reads from its globals: lambda arguments,
    comprehension variables and references left out."""
    import ast

    bound = {"_ref"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Lambda):
            bound |= {a.arg for a in node.args.posonlyargs + node.args.args + node.args.kwonlyargs}
        elif isinstance(node, ast.comprehension):
            bound |= {n.id for n in ast.walk(node.target) if isinstance(n, ast.Name)}
    inner = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
    chains = []
    for node in ast.walk(tree):
        if id(node) in inner or not isinstance(node, (ast.Attribute, ast.Name)):
            continue
        chain = []
        while isinstance(node, ast.Attribute):
            chain.insert(0, node.attr)
            node = node.value
        if isinstance(node, ast.Name) and node.id not in bound:
            chains.append([node.id, *chain])
    return chains


#: run by one new interpreter: it imports torch and MONAI once (what takes the time), then forks one child per
#: combination, each starting from that state, in which neither custom_components nor a config has been loaded
_FORK_EACH = """
import importlib.util, json, os, sys
import monai.bundle, torch
spec = importlib.util.spec_from_file_location("check", sys.argv[1])
check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check)
assert not any(m.startswith("custom_components") for m in sys.modules)
children = {}
for combo in json.loads(sys.argv[2]):
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        try:
            out = {"problems": check.unresolved(combo)}
        except Exception as e:  # noqa: BLE001 - reported by the test of this combination
            out = {"error": f"{type(e).__name__}: {e}"}
        os.write(write, json.dumps(out).encode())
        os._exit(0)
    os.close(write)
    children[pid] = (combo, read)
results = []
for pid, (combo, read) in children.items():
    with os.fdopen(read) as f:
        results.append([combo, json.loads(f.read() or '{"error": "the child died"}')])
    os.waitpid(pid, 0)
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def results():
    """The problems of each combination, each found in a process of its own."""
    combos = [[str(CONFIGS / f) for f in combo] for combo in COMBINATIONS]
    proc = subprocess.run([sys.executable, "-c", _FORK_EACH, __file__, json.dumps(combos)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {tuple(Path(f).name for f in combo): out for combo, out in json.loads(proc.stdout.splitlines()[-1])}


@pytest.mark.parametrize("combo", COMBINATIONS, ids="+".join)
def test_every_component_and_name_of_the_merged_configs_resolves(results, combo):
    assert results[combo] == {"problems": []}


def test_every_config_file_is_in_a_combination():
    shipped = {p.name for p in CONFIGS.glob("*.json")} - NOT_CONFIGS
    assert shipped == {f for combo in COMBINATIONS for f in combo}


def test_the_check_finds_a_missing_import_a_wrong_target_and_a_wrong_argument(tmp_path):
    """The checks above would pass on a walk that sees nothing: each kind of fault is found."""
    config = {"imports": ["$import os", "$import custom_components"], "a": "$os.path.join('x') + str(sys.argv)",
              "b": {"_target_": "custom_components.handlers.checkpointing.NoSuchSaver"},
              "c": {"_target_": "torch.nn.Linear", "in_features": 1, "outfeatures": 1},
              "d": "$custom_components.no_such_module.f(@a)", "e": "$[lambda x: x for y in range(2)]",
              "f": "$torch.nn.Linear"}
    (tmp_path / "bad.json").write_text(json.dumps(config))
    problems = unresolved([str(tmp_path / "bad.json")])
    assert sorted(p.split(":")[0] for p in problems) == ["a", "b", "c", "d"], problems
    assert any("sys does not resolve" in p for p in problems)
    assert any("custom_components.no_such_module does not resolve" in p for p in problems)
    assert any("unexpected keyword argument 'outfeatures'" in p for p in problems)


def test_unknown_attribute_still_raises():
    import custom_components

    with pytest.raises(AttributeError, match="no_such_module"):
        custom_components.no_such_module  # noqa: B018
