"""The layering rule of docs/architecture.md: no code outside a backend's own package branches
on a framework name, and no code outside a data kind's own modules branches on a data-kind
name -- they read the registries (hvdscale.registry BACKENDS, DATA_KINDS) instead.

A "branch" is a comparison with a registered name (`x == "torch"`, `kind in ("synthetic",
...)`), found in the syntax tree, so docstrings, defaults and messages do not count."""
import ast
from pathlib import Path

from hvdscale import registry

PACKAGE = Path(__file__).resolve().parents[1] / "hvdscale"
# Each backend's own package may name itself.
OWN_PACKAGES = {b.name: PACKAGE / b.name for b in registry.BACKENDS}
# Known places still to move, with the reason; the test fails when one of them is clean, so
# the list only shrinks (empty since issue 24).
PENDING = {}


def branches(path, names):
    """(line, name) of every branch on a string constant in `names`: a comparison
    (`x == "torch"`, `kind in (...)`), a `match` case, or a dispatch table (a dict literal
    keyed by the name, `{"torch": ...}[framework]`)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
        elif isinstance(node, ast.MatchValue):
            sides = [node.value]
        elif isinstance(node, ast.Dict):
            sides = [key for key in node.keys if key is not None]
        else:
            continue
        for side in sides:
            values = side.elts if isinstance(side, (ast.Tuple, ast.List, ast.Set)) else [side]
            for value in values:
                if isinstance(value, ast.Constant) and value.value in names:
                    found.append((node.lineno, value.value))
    return found


def offenders():
    names = set(registry.BACKENDS.names()) | set(registry.DATA_KINDS.names())
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if any(own in path.parents for own in OWN_PACKAGES.values()):
            continue
        hits = branches(path, names)
        if hits:
            out[str(path.relative_to(PACKAGE))] = hits
    return out


def test_no_branch_on_a_framework_or_data_kind_name_outside_its_own_package():
    found = offenders()
    unexpected = {f: hits for f, hits in found.items() if f not in PENDING}
    assert not unexpected, f"branches on registered names (use the registries): {unexpected}"
    cleaned = set(PENDING) - set(found)
    assert not cleaned, f"{cleaned} no longer branch on names: remove them from PENDING"


def test_the_check_finds_a_branch(tmp_path):
    # the detector itself: planted comparisons, a match case and a dispatch table are found;
    # a default value, a message and a plain tuple are not
    planted = tmp_path / "x.py"
    planted.write_text('def f(cfg, kind="torch"):\n    if cfg.framework == "torch":\n'
                       '        return 1\n    return kind in ("synthetic", "other")\n'
                       'def g(framework):\n    match framework:\n        case "tensorflow":\n'
                       '            return 2\n    return {"torch": 3}[framework]\n'
                       'NAMES = ("torch",)\nMESSAGE = "needs torch"\n')
    assert sorted(branches(planted, {"torch", "tensorflow", "synthetic"})) == \
        [(2, "torch"), (4, "synthetic"), (7, "tensorflow"), (9, "torch")]
