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


def helpers_imports(path: Path) -> set[str]:
    """Every helpers module that ``path`` imports, at module level or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:
                found.add(node.module.split(".")[0])
            elif node.level == 1:
                found.update(alias.name for alias in node.names)
            elif node.module and node.module.startswith("helpers."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("helpers."))
    return found


def test_every_module_is_placed_and_imports_only_earlier_stages():
    order = documented_order()
    modules = sorted(p.stem for p in PACKAGE.glob("*.py"))
    assert set(modules) == set(order) | set(OUTSIDE_THE_ORDER), "a module is missing from the documented order"
    for module in modules:
        imported = helpers_imports(PACKAGE / f"{module}.py") - {module}
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
    for path in PACKAGE.glob("*.py"):
        text = path.read_text()
        for pipe in ("txt2img", "inpaint"):
            calls.setdefault(pipe, []).extend([path.stem] * len(re.findall(rf"models\.{pipe}\(", text)))
    assert calls == {"txt2img": ["adapters"], "inpaint": ["pipeline"]}
