"""The README's command examples still run: every command of its ``bash`` blocks and its command table, dry-run
(stages: ``--print-config``; the sweep: ``--dry-run``; other tools: ``--help``), with the placeholders filled in;
and the ``$ command  # exit N`` examples exit with N and print the line the README shows."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import re
import shlex
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
STAGES = {"pretrain": "pretrain.__main__", "downstream.cls": "downstream.cls.__main__",
          "downstream.det.train": "downstream.det.train"}
LAUNCHERS = ("slurm/launch_all.py", "slurm")
PLACEHOLDERS = {"W": "none", "C": "tiny", "R": "tiny", "M": "resnet18", "DIR": "/data/dir", "OUT": "runs/out",
                "IN1K": "/data/in1k", "COCO": "/data/coco", "CKPT": "ckpt.pth", "SRC": "src.pth", "DST": "dst.pth"}


def _bash_commands() -> list[str]:
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            if line.startswith(("python", "torchrun", "srun")):
                commands.append(line)
    commands += re.findall(r"^\| `((?:python|torchrun) [^`]+)`", README, re.M)
    return commands


def _module_argv(command: str) -> tuple[str, list[str]]:
    """``(module, argv)`` of a README command, launcher prefixes dropped, optional ``[...]`` parts left out and the
    placeholders filled in."""
    command = re.sub(r"\s\[[^\]]*\]", "", command.replace("\\|", "|"))
    tokens = [PLACEHOLDERS.get(t, t) for t in shlex.split(command)]
    if "-m" in tokens:
        at = tokens.index("-m")
        return tokens[at + 1], tokens[at + 2:]
    script = next(t for t in tokens if t.endswith(".py"))
    return script.removesuffix(".py").replace("/launch_all", ""), tokens[tokens.index(script) + 1:]


def _dry(module: str, argv: list[str]) -> tuple[str, list[str]]:
    """The entry point to call and the argv that makes the command a dry run."""
    if module in STAGES:
        return STAGES[module], argv if "--print-config" in argv else [*argv, "--print-config"]
    if module in LAUNCHERS:
        return "slurm.launcher", argv if "--status" in argv or "--dry-run" in argv else [*argv, "--dry-run"]
    return module, ["--help"]


def _call(module: str, argv: list[str]) -> tuple[int, str, str]:
    """Run ``python -m module argv`` in this process: ``(exit code, stdout, stderr)``."""
    if importlib.util.find_spec(module).submodule_search_locations:  # a package: its __main__
        module += ".__main__"
    main = importlib.import_module(module).main
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exit_:
            code = exit_.code
    return code or 0, out.getvalue(), err.getvalue()


COMMANDS = _bash_commands()


def test_the_readme_has_commands_of_every_stage():
    modules = {_module_argv(c)[0] for c in COMMANDS}
    assert {"pretrain", "downstream.cls", "downstream.det.train", "slurm", "results"} <= modules, modules


@pytest.mark.parametrize("command", COMMANDS)
def test_readme_command_dry_runs(command, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # relative run folders of the examples land here (a dry run writes none)
    module, argv = _dry(*_module_argv(command))
    given = PLACEHOLDERS["CKPT"]
    (tmp_path / given).write_bytes(b"")  # the launcher's --weights must exist (with --model it is not read)
    code, out, err = _call(module, argv)
    assert code == 0, f"{command}\n{err[-2000:]}"
    written = sorted(p.name for p in tmp_path.iterdir() if p.name != given)
    assert not written, f"{command} wrote {written}"


ERROR_EXAMPLES = re.findall(r"^\$ (python .*?)\s+# exit (\d)\n(.*)$", README, re.M)


def _write_example_file(name: str, folder: Path) -> None:
    """The input files the README's error examples name, as the README describes them."""
    import timm
    import torch

    if name == "unknown.pth":  # a file of no weights layout: keys ``format`` and ``x``
        torch.save({"format": 1, "x": torch.zeros(2)}, folder / name)
    elif name == "resnet18-plain.pth":  # a plain state dict of timm resnet18
        torch.save(timm.create_model("resnet18").state_dict(), folder / name)


@pytest.mark.parametrize(("command", "code", "message"), ERROR_EXAMPLES)
def test_readme_error_examples_print_what_they_show(command, code, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for token in shlex.split(command):
        _write_example_file(token, tmp_path)
    module, argv = _module_argv(command)
    exit_code, _, err = _call(module, argv)
    shown = message.split("...")[0].strip()
    assert exit_code == int(code) and err.strip().splitlines()[-1].startswith(shown), (err, shown)
