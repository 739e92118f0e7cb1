"""The command line: its parser is cheap to build, and bad input is one clear line, not a traceback."""

from __future__ import annotations

import subprocess
import sys

from moslora.cli.main import main

HEAVY = ("transformers", "diffusers", "peft", "datasets", "bitsandbytes", "matplotlib", "scipy")


def test_building_the_parser_imports_no_heavy_library():
    code = (
        "import sys, moslora.cli.main as m; m.build_parser(); "
        f"print(sorted({{k.split('.')[0] for k in sys.modules}} & set({HEAVY!r})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_every_subcommand_has_help(capsys):
    for command in ("demo", "train", "eval", "export", "compare", "generate"):
        try:
            main([command, "--help"])
        except SystemExit as e:
            assert e.code == 0
        assert "usage: moslora " + command in capsys.readouterr().out


def test_bad_input_is_one_line_and_exit_code_2(capsys, tmp_path):
    assert main(["export", str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moslora export: error:") and "missing" in err and "Traceback" not in err


def test_the_toy_demo_runs_and_prints_both_methods(capsys):
    assert main(["demo", "--steps", "20"]) == 0
    out = capsys.readouterr().out
    assert "lora" in out and "moslora" in out and "final" in out
