"""The package's layering, read from the source with ast (no igops module is imported): no import
cycles, nothing imports the command line from below, the programs igops ships to hosts need only
the standard library, and only the `igops lab` command reaches into the lab."""

import ast
import functools
import sys
from collections.abc import Callable, Iterable
from itertools import pairwise
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "igops"

# The top of the graph. The console script (pyproject's [project.scripts]) is igops.launcher, and
# `python -m igops` (igops.__main__) runs it; it renders the root's help from igops.command_table
# and hands every other command line to igops.cli, which imports the command modules by name
# (importlib, which ast does not see: a downward edge anyway).
ENTRY_MODULES = {"igops.__main__", "igops.launcher", "igops.command_table", "igops.cli"}
# The commands parse, confirm and render; the work is done in the modules below them.
COMMANDS_PACKAGE = "igops.commands"
# The lab is development and test tooling built on igops. `igops lab up|down|status` is its own
# front end, the one module outside it that may import it; no domain module may.
LAB_PACKAGE = "igops.lab"
LAB_COMMAND = "igops.commands.lab"
# Programs run on a host by the host's own python3: igops.agent.invocation sends an agent over
# stdin to `python3 -I -S`, and munin-node runs the plugin `igops munin install` links. No igops
# and no site-packages there. igops/agent/__init__.py is not one: it runs in igops to send them.
REMOTE_PROGRAMS = [
    *sorted(path for path in (PACKAGE / "agent").glob("*.py") if path.name != "__init__.py"),
    PACKAGE / "munin_plugins" / "igops_",
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULE_PATHS = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def in_package(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def from_base(node: ast.ImportFrom, importer: str, is_package: bool) -> str:
    """The module a `from X import ...` reads from, relative forms resolved against the importer."""
    if not node.level:
        return node.module or ""
    package = importer if is_package else importer.rpartition(".")[0]
    base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
    return f"{base}.{node.module}" if node.module else base


@functools.cache
def imported_modules(path: Path) -> dict[str, int]:
    """Every module the file imports, at module level or inside a function, with the line of its
    first import. `from igops.pg import archive_repository` imports the module
    igops.pg.archive_repository; `from igops.errors import UsageError` imports igops.errors."""
    importer, found = module_name(path), {}

    def visit(nodes: Iterable[ast.AST]) -> None:
        for node in nodes:
            if isinstance(node, ast.If) and is_type_checking(node.test):
                # The body never runs, so it cannot take part in an import at run time. It is how a
                # module names, for its annotations, a type of a module that imports it: counted,
                # the deploy_* modules' annotations alone would make a cycle. Its else branch runs.
                visit(node.orelse)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    found.setdefault(alias.name, node.lineno)
            elif isinstance(node, ast.ImportFrom):
                base = from_base(node, importer, path.name == "__init__.py")
                for alias in node.names:
                    submodule = f"{base}.{alias.name}"
                    found.setdefault(submodule if submodule in MODULE_PATHS else base, node.lineno)
            else:  # imports are statements: expressions (most of the tree) hold none
                visit(child for child in ast.iter_child_nodes(node) if not isinstance(child, ast.expr))

    visit([ast.parse(path.read_bytes(), str(path))])
    return found


@functools.cache
def import_graph() -> dict[str, dict[str, int]]:
    """Each igops module -> the igops modules it imports -> the line. An edge goes to the module
    named, not to the packages above it: a package whose __init__ imports its own modules would
    otherwise be a cycle with each of them, which Python runs without trouble."""
    return {
        importer: {module: line for module, line in imported_modules(path).items() if module in MODULE_PATHS}
        for importer, path in MODULE_PATHS.items()
    }


def edges(graph: dict[str, dict[str, int]], wrong: Callable[[str, str], bool]) -> list[str]:
    return [
        f"{importer} imports {module} ({MODULE_PATHS[importer].relative_to(PACKAGE.parent)}:{line})"
        for importer, imports in sorted(graph.items())
        for module, line in sorted(imports.items())
        if wrong(importer, module)
    ]


def find_cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One cycle per back edge of a depth-first search, as a path from a module back to itself."""
    cycles, on_path, finished = [], [], set()

    def visit(module: str) -> None:
        on_path.append(module)
        for imported in sorted(graph[module]):
            if imported in on_path:
                cycles.append([*on_path[on_path.index(imported) :], imported])
            elif imported not in finished:
                visit(imported)
        on_path.pop()
        finished.add(module)

    for module in sorted(graph):
        if module not in finished:
            visit(module)
    return cycles


def test_the_modules_the_rules_name_exist():
    # A renamed module would otherwise make its rule pass by checking nothing.
    assert ENTRY_MODULES | {COMMANDS_PACKAGE, LAB_PACKAGE, LAB_COMMAND} <= MODULE_PATHS.keys()
    assert len(REMOTE_PROGRAMS) > 1 and all(path.is_file() for path in REMOTE_PROGRAMS)


def test_no_import_cycles():
    graph = import_graph()

    def path(cycle: list[str]) -> str:
        hops = [f"{module} (line {graph[module][imported]})" for module, imported in pairwise(cycle)]
        return " -> ".join([*hops, cycle[-1]])

    cycles = [path(cycle) for cycle in find_cycles(graph)]
    assert not cycles, "import cycles (each line is where that module imports the next):\n" + "\n".join(cycles)


def test_nothing_imports_the_command_line_from_below():
    def upward(importer: str, module: str) -> bool:
        if importer in ENTRY_MODULES:
            return False
        if module in ENTRY_MODULES:
            return True
        return in_package(module, COMMANDS_PACKAGE) and not in_package(importer, COMMANDS_PACKAGE)

    assert not (found := edges(import_graph(), upward)), "\n".join(found)


def test_remote_programs_import_only_the_standard_library():
    """An agent may import another agent module too: igops.agent.program sends it along (as long
    as that one imports none; program refuses otherwise). Nothing else of igops is there."""
    # sys.stdlib_module_names has no "igops", so an import of igops (relative ones resolved) fails too.
    agents = {module_name(path) for path in REMOTE_PROGRAMS if path.parent == PACKAGE / "agent"}
    found = [
        f"{path.relative_to(PACKAGE.parent)}:{line} imports {module}"
        for path in REMOTE_PROGRAMS
        for module, line in imported_modules(path).items()
        if module.partition(".")[0] not in sys.stdlib_module_names
        and not (path.parent == PACKAGE / "agent" and module in agents)
    ]
    assert not found, "\n".join(found)


def test_an_agent_runs_on_a_bare_python_with_the_agent_modules_it_imports_sent_along():
    """The page-cache agent imports the profile format from igops.agent.pagecache_profile; sent
    to a python3 with no igops (-I -S, from another directory), it still runs."""
    import subprocess

    from igops import agent

    command, prefix = agent.invocation("pagecache", ["--help"])
    ran = subprocess.run(command, shell=True, input=prefix, capture_output=True, timeout=60, cwd="/")
    assert ran.returncode == 0 and b"capture" in ran.stdout, ran.stderr
    assert agent.program("freeze") == (PACKAGE / "agent" / "freeze.py").read_bytes()  # none imported: as it is


def test_only_the_lab_command_imports_the_lab():
    def into_lab(importer: str, module: str) -> bool:
        return in_package(module, LAB_PACKAGE) and not in_package(importer, LAB_PACKAGE) and importer != LAB_COMMAND

    assert not (found := edges(import_graph(), into_lab)), "\n".join(found)
