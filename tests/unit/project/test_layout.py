"""The package's layers, its commands, and the tests' own tree (helpers in one module, the index in docs/tests.md).

The package's layout is its architecture: lower layers never import higher ones, no module imports
itself back through others, the losses (dual_loss.py, dpo_loss.py) stand alone, and every tool is one `higgs-ddp` command."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import INDEX_END, INDEX_START, ROOT, TORCHRUN_ENV, module_index, tiny_config

from higgs_ddp.cli import COMMANDS

PKG = ROOT / "src" / "higgs_ddp"
# Bottom to top: what a layer may import is at its level or below (lazy imports inside functions included).
LAYERS = [
    ("higgs_ddp.config", "higgs_ddp.dual_loss", "higgs_ddp.dpo_loss", "higgs_ddp.errors"),  # leaves
    ("higgs_ddp.runtime",),  # the process group and how a process ends
    ("higgs_ddp.data",),  # manifest -> audio -> codes -> prompts -> dataset -> batches
    ("higgs_ddp.model", "higgs_ddp.quantize"),  # HiggsAudioModel built, wrapped for a training mode, HiggsForward
    ("higgs_ddp.evaluation",),  # validation, listening samples
    ("higgs_ddp.training",),  # trainer, optimizer, parallel strategy, checkpoints, stops, logs
    ("higgs_ddp.tools",),  # export, plot, doctor, bench, demo data
    ("higgs_ddp.train", "higgs_ddp.cli", "higgs_ddp.__main__", "higgs_ddp.manifest", "higgs_ddp.speak",
     "higgs_ddp.score", "higgs_ddp"),  # entry points
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(name: str) -> int:
    for i, prefixes in enumerate(LAYERS):
        if any(name == p or name.startswith(p + ".") for p in prefixes if p != "higgs_ddp") or name in prefixes:
            return i
    raise AssertionError(f"{name} is in no layer of tests/unit/project/test_layout.py")


def imports(path: Path) -> set:
    """Every higgs_ddp module a file imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("higgs_ddp"):
            assert node.level == 0, f"{path}: relative import (the layout uses absolute ones)"
            for alias in node.names:  # "from higgs_ddp.data import prepare" imports a module
                sub = f"{node.module}.{alias.name}"
                found.add(sub if (PKG.parent / (sub.replace(".", "/") + ".py")).exists() else node.module)
        elif isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path}: relative import (the layout uses absolute ones)")
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("higgs_ddp")}
    return found


GRAPH = {module_name(p): imports(p) for p in PKG.rglob("*.py")}


def test_lower_layers_never_import_higher_ones():
    upward = [f"{m} (layer {layer(m)}) imports {d} (layer {layer(d)})"
              for m, deps in sorted(GRAPH.items()) for d in sorted(deps) if layer(d) > layer(m)]
    assert not upward, "\n".join(upward)


def test_no_import_cycles():
    def cycle_from(start):
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for dep in GRAPH.get(node, ()):
                if dep == start:
                    return path + [dep]
                if dep not in seen and dep in GRAPH:
                    seen.add(dep)
                    stack.append((dep, path + [dep]))
        return None

    cycles = [" -> ".join(c) for m in sorted(GRAPH) if (c := cycle_from(m))]
    assert not cycles, "\n".join(cycles)


@pytest.mark.parametrize("loss", ["dual_loss.py", "dpo_loss.py"])
def test_dual_loss_depends_on_torch_only(loss):
    tree = ast.parse((PKG / loss).read_text())
    roots = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    roots |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert roots <= {"torch", "__future__", "dataclasses", "typing"}, roots


def test_one_command_line_lists_every_tool():
    proc = subprocess.run([sys.executable, "-m", "higgs_ddp", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert {"train", "prepare", "export", "doctor", "plot", "bench", "manifest", "speak", "smoke", "score"} <= set(COMMANDS)
    for command in COMMANDS:
        assert f"\n  {command} " in proc.stdout, command


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_command_has_help_with_an_example(command, capsys, monkeypatch):
    """In this process (the entry point itself is run above): a new interpreter per command costs ~4.5 s."""
    from higgs_ddp.cli import main

    monkeypatch.setattr(sys, "argv", list(sys.argv))  # main names argparse's prog through sys.argv[0]
    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    out = capsys.readouterr().out
    assert done.value.code == 0
    assert f"usage: higgs-ddp {command}" in out
    assert f"higgs-ddp {command} " in out.split("\n", 2)[-1], "an example in the help text"


def test_an_unknown_command_is_one_line():
    proc = subprocess.run([sys.executable, "-m", "higgs_ddp", "trian"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "unknown command 'trian'" in proc.stderr


def test_launch_options_go_to_torchrun():
    from higgs_ddp.cli import needs_launcher, split_launch_options, torchrun_argv

    launch, rest = split_launch_options(["--nproc_per_node=2", "--config", "c.yaml", "--max-restarts", "3", "a.b=1"])
    assert launch == ["--nproc-per-node=2", "--max-restarts", "3"] and rest == ["--config", "c.yaml", "a.b=1"]
    cmd = torchrun_argv("train", launch, rest)
    assert cmd[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    assert cmd[5:] == ["--max-restarts", "3", "-m", "higgs_ddp", "train", "--config", "c.yaml", "a.b=1"]
    nodes = torchrun_argv("train", ["--nnodes", "2", "--rdzv-endpoint", "h:29500"], [])
    assert "--standalone" not in nodes  # a rendezvous across nodes, not a local one
    assert not needs_launcher(["--nproc-per-node", "1"]) and needs_launcher(["--nproc-per-node", "2"])


@pytest.mark.slow
def test_a_failed_launched_run_ends_with_its_one_line_error(tmp_path):
    """higgs-ddp train --nproc-per-node 2 starts torchrun; the ranks' error comes last, below torchrun's report.
    (An error the config alone shows never gets that far: tests/unit/training/test_run_folder.py.)"""
    import yaml

    nowhere = tmp_path / "nowhere"  # a resume path is looked at by the ranks, not by the config
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(tiny_config(tmp_path, f"train.resume={nowhere}").to_dict()))
    proc = subprocess.run([sys.executable, "-m", "higgs_ddp", "train", "--nproc-per-node", "2", "--config",
                           str(config)], capture_output=True, text=True, cwd=ROOT, env=TORCHRUN_ENV, timeout=300)
    assert proc.returncode != 0
    assert "ChildFailedError" in proc.stderr  # torchrun's own report is there...
    assert proc.stderr.rstrip().splitlines()[-1] == (f"higgs-ddp: error: train.resume={nowhere}: not a complete "
                                                     f"checkpoint folder (no state.json); use auto, never or a "
                                                     f"checkpoints/step_N folder")


def _help(command, capsys) -> str:
    from higgs_ddp.cli import main

    with pytest.raises(SystemExit):
        main([command, "--help"])
    return capsys.readouterr().out


@pytest.mark.parametrize("command", [name for name, c in COMMANDS.items() if c.launched])
def test_the_commands_that_start_torchrun_say_so_in_their_help(command, capsys, monkeypatch):
    """train, prepare and bench take --nproc-per-node and torchrun's options (cli.py takes them off before
    the command's parser): their --help lists them, and speaks to a user, not of source files."""
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    out = _help(command, capsys)
    assert "--nproc-per-node N    processes on this machine" in out and "--rdzv-endpoint" in out
    assert ".py" not in out and "The loop below" not in out, out


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_option_of_every_command_says_what_it_is(command, capsys, monkeypatch):
    """No option in --help without a word on it (demo-data's were bare): the parser each command builds,
    caught as it parses, every action of it and of its sub-commands."""
    import argparse

    from higgs_ddp.cli import main

    class Built(Exception):
        pass

    def caught(parser, *args, **kwargs):
        raise Built(parser)

    monkeypatch.setattr(sys, "argv", list(sys.argv))
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", caught)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_intermixed_args", caught)
    with pytest.raises(Built) as built:
        main([command, "--help"])
    bare, parsers = [], [(command, built.value.args[0])]
    while parsers:
        name, parser = parsers.pop()
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                parsers += [(f"{name} {sub}", p) for sub, p in action.choices.items()]
            elif not action.help:
                bare.append(f"{name} {'/'.join(action.option_strings) or action.dest}")
    assert bare == []


def test_every_error_of_the_package_is_a_higgs_error():
    """One error base: each exception class the package defines derives from errors.HiggsError, which every
    command prints as one line (exit 2) and nothing else is printed so. Outside it: the standalone loss's
    AlignmentError (dual_loss.py imports nothing of ours) and the corpus index's internal signal to rebuild."""
    import importlib

    from higgs_ddp.errors import HiggsError

    outside = {"higgs_ddp.dual_loss.AlignmentError", "higgs_ddp.data.corpus_index.IndexInvalid"}
    found = []
    for path in PKG.rglob("*.py"):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ClassDef):
                cls = getattr(importlib.import_module(module_name(path)), node.name)
                if isinstance(cls, type) and issubclass(cls, BaseException):
                    found.append((f"{module_name(path)}.{node.name}", cls))
    assert len(found) > 20
    assert [name for name, cls in found if not issubclass(cls, HiggsError) and name not in outside] == []


@pytest.mark.parametrize("command", ["speak", "score"])
def test_a_bug_keeps_its_traceback_and_only_user_errors_are_one_line(command, tmp_path, monkeypatch, capsys):
    """speak and score caught every ValueError and OSError: a bug inside torch read as a user's mistake, with
    no traceback. Now only a HiggsError is one line; a ValueError from below propagates."""
    import importlib

    from higgs_ddp.cli import main

    tool = importlib.import_module(f"higgs_ddp.tools.{command}")

    def bug(*args, **kwargs):
        raise ValueError("a bug deep inside torch")

    monkeypatch.setattr(tool, command, bug)
    with pytest.raises(ValueError, match="a bug deep inside torch"):
        main([command, "--model", str(tmp_path), "--prompts", str(tmp_path / "p.jsonl")]
             if command == "score" else [command, "--model", str(tmp_path), "--text", "hi", "--out", str(tmp_path / "o.wav")])


# The tests' own tree (docs/tests.md says where a test lives).
TESTS = ROOT / "tests"
TEST_MODULES = sorted(TESTS.rglob("test_*.py"))


def imported_modules(path: Path) -> list:
    tree = ast.parse(path.read_text())
    return ([a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
            + [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module])


def test_no_test_module_imports_another_or_conftest():
    """What tests share is in tests/helpers.py (fixtures in conftest.py, which pytest loads by itself): moving or
    renaming a test module breaks no other."""
    found = [f"{path.relative_to(ROOT)} imports {name}"
             for path in [*TEST_MODULES, TESTS / "helpers.py", TESTS / "conftest.py", *TESTS.glob("fixtures/**/*.py")]
             for name in imported_modules(path) if name.split(".")[0] == "conftest" or name.startswith("test_")]
    assert not found, "\n".join(found)


def test_every_test_module_says_what_it_proves_in_one_line():
    """The first line of each module's docstring, a sentence of its own: docs/tests.md lists it."""
    bad = []
    for path in TEST_MODULES:
        lines = (ast.get_docstring(ast.parse(path.read_text())) or "").splitlines()
        if not lines or not lines[0].endswith(".") or (len(lines) > 1 and lines[1]):
            bad.append(str(path.relative_to(ROOT)))
    assert not bad, "a docstring whose first line is not a sentence of its own:\n" + "\n".join(bad)


def test_docs_tests_md_lists_every_test_module():
    text = (ROOT / "docs" / "tests.md").read_text()
    listed = text[text.index(INDEX_START) + len(INDEX_START):text.index(INDEX_END)]
    assert listed == module_index(), "docs/tests.md's index is not the test modules' docstrings: python tests/helpers.py"
