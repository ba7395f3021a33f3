"""The `wanlite` command line as a user meets it: fast help, every command discoverable."""

import subprocess
import sys

HEAVY = ("torch", "diffusers", "transformers", "mlflow", "prefect")


def test_help_lists_every_command_without_importing_heavy_libraries():
    # `wanlite --help` must answer instantly: command modules import heavy libraries inside run().
    code = (
        "import sys; from wanlite.cli import build_parser; p = build_parser(); "
        "p.format_help(); print(','.join(m for m in %r if m in sys.modules))" % (HEAVY,)
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_every_command_has_help():
    from wanlite.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert {"fetch", "validate", "synth-teacher"} <= set(sub.choices)
    for name, command in sub.choices.items():
        assert command.format_help().strip(), name
        assert command.description or command.format_usage(), name


def test_the_library_never_imports_prefect():
    # The layering rule of DESIGN.md §1: steps are plain functions; only flows/ knows Prefect.
    import ast
    from pathlib import Path

    import wanlite

    offenders = []
    for path in Path(wanlite.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] == "prefect"]
    assert offenders == []
