"""The package's shape, checked: imports point down the documented stage order, ``config`` is plain data, the
generate-then-decode call exists once."""
import ast
import re
import sys
from pathlib import Path

import helpers

PACKAGE = Path(helpers.__file__).parent
OUTSIDE_THE_ORDER = {"__init__": {"config"}, "__main__": {"run"}, "install": set()}  # what each may import


def documented_order() -> list[str]:
    match = re.search(r"Stage order[^\n]*\n\n(.*?)\n\n", helpers.__doc__, re.S)
    return [name.strip() for name in match.group(1).replace("\n", " ").split("->")]


def stage_of(parts: list[str]) -> str:
    """The stage a module path inside ``helpers`` belongs to: the world's renderer (``world``, ``world.scenes``) is
    ``world``; its trainer and evaluator are ``world.train`` and ``world.evaluate``."""
    if parts[:1] == ["world"]:
        return "world." + parts[1] if len(parts) > 1 and parts[1] in ("train", "evaluate") else "world"
    return parts[0]


def module_parts(path: Path) -> list[str]:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    return parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts


def helpers_imports(path: Path) -> set[str]:
    """Every helpers stage that ``path`` imports, at module level or inside a function (relative imports resolved
    from where the file lies, so a subpackage's ``from .. import world`` counts too)."""
    here = list(path.relative_to(PACKAGE).parent.parts) if path.is_relative_to(PACKAGE) else []
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[:len(here) - (node.level - 1)] if node.level > 1 else here
                targets = [base + node.module.split(".")] if node.module else [base + [a.name] for a in node.names]
                found.update(stage_of(t) for t in targets if t)
            elif node.module and node.module.startswith("helpers."):
                found.add(stage_of(node.module.split(".")[1:]))
        elif isinstance(node, ast.Import):
            found.update(stage_of(a.name.split(".")[1:]) for a in node.names if a.name.startswith("helpers."))
    return found


def test_every_module_is_placed_and_imports_only_earlier_stages():
    order = documented_order()
    files = {path: stage_of(module_parts(path)) for path in PACKAGE.rglob("*.py")}
    assert set(files.values()) == set(order) | set(OUTSIDE_THE_ORDER), "a module is missing from the documented order"
    for path, module in files.items():
        imported = helpers_imports(path) - {module}
        if module in OUTSIDE_THE_ORDER:
            assert imported <= OUTSIDE_THE_ORDER[module], (module, imported)
            continue
        later = {m for m in imported if order.index(m) > order.index(module)}
        assert not later, f"{module} imports later stage(s) {sorted(later)}"


def test_config_and_install_use_only_the_standard_library():
    for module in ("config", "install"):
        tree = ast.parse((PACKAGE / f"{module}.py").read_text())
        roots = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        roots |= {n.module.split(".")[0] for n in ast.walk(tree)
                  if isinstance(n, ast.ImportFrom) and n.level == 0 and n.module}
        assert roots <= set(sys.stdlib_module_names) | {"__future__", "pip"}, (module, roots)


def test_the_import_checker_catches_a_backward_import(tmp_path):
    bad = tmp_path / "layout.py"
    bad.write_text("def f():\n    from .pipeline import region_pass\nfrom helpers.qa import qa_loop\n")
    assert helpers_imports(bad) == {"pipeline", "qa"}


def test_one_text_to_image_call_and_one_inpaint_call():
    calls = {}
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        for pipe in ("txt2img", "inpaint"):
            calls.setdefault(pipe, []).extend([path.stem] * len(re.findall(rf"models\.{pipe}\(", text)))
    assert calls == {"txt2img": ["adapters"], "inpaint": ["pipeline"]}
