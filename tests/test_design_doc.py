"""docs/design.md against the code: its import floors and arrows, and its table of files.

The import graph is read from the source with `ast` (no module is
imported): a part is a top-level module or package of `tfmeta`, and an edge
A -> B means some module of A imports some module of B, marked
function-level when every such import sits inside a function.
"""

import ast
import collections
import contextlib
import io
import pathlib
import re

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = REPO / "tfmeta"
DESIGN = REPO / "docs" / "design.md"

#: The one import that may run upwards (design.md: "the one import that runs
#: upwards is `cli/`'s function-level import of `configurables`").
UPWARD = {("cli", "configurables")}


def _module_name(path):
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported_modules(node, module, is_package):
    """The absolute module names an import statement names (`from a import b`: a.b and a)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:  # relative: resolved against the importing module's package
        package = module.split(".") if is_package else module.split(".")[:-1]
        package = package[: len(package) - node.level + 1]
        base = ".".join(package + ([node.module] if node.module else []))
    return [base] + [f"{base}.{alias.name}" for alias in node.names]


def _part(module):
    """tfmeta.cli.job -> cli, tfmeta.atomic -> atomic, tfmeta -> None (the package root)."""
    names = module.split(".")
    return names[1] if len(names) > 1 else None


def code_graph():
    """`{part: {imported part: function-level only?}}` and the set of all parts."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    edges = collections.defaultdict(dict)
    for module, path in modules.items():
        src = _part(module)
        tree = ast.parse(path.read_text())
        in_function = {
            id(inner) for outer in ast.walk(tree)
            if isinstance(outer, (ast.FunctionDef, ast.AsyncFunctionDef))
            for inner in ast.walk(outer)
        }
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            named = _imported_modules(node, module, path.name == "__init__.py")
            # `from tfmeta import atomic` imports the module tfmeta.atomic; a
            # name that is no module (`from tfmeta.x import f`) counts as its module.
            parts = {_part(n) for n in named if n in modules and n.startswith("tfmeta.")}
            for dst in parts - {src, None}:
                edges[src][dst] = edges[src].get(dst, True) and id(node) in in_function
    every = {_part(m) for m in modules} - {None}
    return dict(edges), every


def _diagram():
    """The import picture's code block in design.md."""
    section = DESIGN.read_text().split("### How the parts import each other", 1)[1]
    return section.split("```", 2)[1]


def diagram_floors(block):
    """`{part: floor}` from the `floor N   a   b/ ...` lines (and their continuation lines)."""
    floors, current = {}, None
    for line in block.splitlines():
        match = re.match(r"\s*floor (\d+)\s+(.*)", line)
        if match:
            current, names = int(match.group(1)), match.group(2)
        elif current is not None and line.strip() and "->" not in line:
            names = line
        else:
            current = None
            continue
        for name in names.split():
            part = name.rstrip("/")
            assert part not in floors, f"{part} is on two floors of design.md's diagram"
            floors[part] = current
    return floors


def diagram_arrows(block):
    """`{part: {imported part: function-level only?}}` from the `part -> a, b*, c (x, y)` lines."""
    arrows, current = {}, None
    for line in block.splitlines():
        if line.strip().startswith("the tools'"):
            break  # the tools' entry points are scripts, not parts
        match = re.match(r" (\S+)\s+-> (.*)", line)
        if match:
            current = match.group(1).rstrip("/")
            assert current not in arrows, f"{current} has two arrow lines in design.md's diagram"
            arrows[current] = match.group(2)
        elif current is not None and line.startswith("    ") and line.strip():
            arrows[current] += " " + line.strip()
        else:
            current = None
    parsed = {}
    for src, text in arrows.items():
        text = re.sub(r"\([^)]*\)", "", text)  # "cli (job, finetune)": the modules, for the reader
        targets = [t.strip() for t in text.split(",") if t.strip()]
        parsed[src] = {t.rstrip("*").rstrip("/"): t.endswith("*") for t in targets}
    return parsed


def test_every_part_is_on_one_floor_of_the_diagram():
    _, parts = code_graph()
    floors = diagram_floors(_diagram())
    assert set(floors) == parts, (
        f"design.md's floors miss {sorted(parts - set(floors))} and name "
        f"{sorted(set(floors) - parts)}, which are no parts of tfmeta"
    )


def test_no_part_imports_one_on_its_own_floor_or_higher():
    edges, _ = code_graph()
    floors = diagram_floors(_diagram())
    upward = sorted(
        (src, dst, "inside a function" if fn else "at module level")
        for src, targets in edges.items() for dst, fn in targets.items()
        if src in floors and dst in floors  # a part on no floor: the test above
        and floors[src] <= floors[dst] and not ((src, dst) in UPWARD and fn)
    )
    assert not upward, f"imports that run up design.md's floors: {upward}"


def test_the_diagram_arrows_are_the_code_imports():
    edges, _ = code_graph()
    arrows = diagram_arrows(_diagram())
    differ = []
    for part in sorted(set(edges) | set(arrows)):
        drawn, imported = arrows.get(part, {}), edges.get(part, {})
        if drawn != imported:
            differ.append(
                f"{part}: not drawn {sorted(set(imported) - set(drawn))}, not imported "
                f"{sorted(set(drawn) - set(imported))}, '*' wrong on "
                f"{sorted(d for d in set(drawn) & set(imported) if drawn[d] != imported[d])}"
            )
    assert not differ, "design.md's arrows differ from the code's imports: " + "; ".join(differ)


def test_the_docs_recipe_derives_the_same_graph(monkeypatch):
    """The plain-Python recipe design.md gives for re-deriving the picture prints the code's arrows."""
    recipe = DESIGN.read_text().split("Re-derive them with plain Python", 1)[1].split("```python", 1)[1]
    recipe = recipe.split("```", 1)[0]
    printed = io.StringIO()
    monkeypatch.chdir(REPO)
    with contextlib.redirect_stdout(printed):
        exec(compile(recipe, str(DESIGN), "exec"), {})
    derived = {}
    for line in printed.getvalue().splitlines():
        src, targets = (side.strip() for side in line.split("->"))
        derived[src] = {t.rstrip("*"): t.endswith("*") for t in targets.split(", ")}
    assert derived == code_graph()[0]


def test_the_file_table_lists_every_module_once():
    listed = re.findall(r"^\| `(tfmeta/[^`]+\.py)` \|", DESIGN.read_text(), flags=re.M)
    files = sorted(str(p.relative_to(REPO)) for p in PACKAGE.rglob("*.py"))
    assert sorted(listed) == files, (
        f"design.md's table misses {sorted(set(files) - set(listed))}, lists "
        f"{sorted(set(listed) - set(files))} (no such file), or lists one twice"
    )


def test_the_parser_reads_floors_arrows_and_marks():
    """The parsers above on a small picture whose floors and arrows are known."""
    block = (
        "\n floor 2   top/      mid\n floor 1   low\n           base\n\n"
        " top/  -> mid (a, b), low,\n          base*\n mid   -> low\n\n the tools' x -> y\n"
    )
    assert diagram_floors(block) == {"top": 2, "mid": 2, "low": 1, "base": 1}
    assert diagram_arrows(block) == {"top": {"mid": False, "low": False, "base": True}, "mid": {"low": False}}
