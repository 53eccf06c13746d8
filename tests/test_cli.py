"""``python -m fbackprop demo | bench | explain``: user mistakes are one line and exit 2.

Most cases call the dispatcher in-process (fast); two run the real command in
a subprocess to see exactly what a user sees. ``--help`` texts are plain (no
reStructuredText markup) and show the defaults.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from fbackprop import __main__ as cli
from fbackprop._src import cli as explain_cli
from fbackprop._src.tools.explain import explain
from fbackprop.bench import report as bench_report
from fbackprop.bench.harness import FIGURES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(argv, capsys):
    """(exit code, stdout, stderr) of ``python -m fbackprop *argv``, in-process."""
    try:
        code = cli.main(list(argv))
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_usage_error(result, prog, *words):
    code, out, err = result
    assert code == 2, (code, out, err)
    assert "Traceback" not in err + out
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"{prog}: error: "), lines[0]
    for word in words:
        assert word in lines[0], (word, lines[0])


@pytest.fixture
def no_graphviz(monkeypatch):
    real = explain_cli.shutil.which
    monkeypatch.setattr(explain_cli.shutil, "which",
                        lambda name, *a, **k: None if name == "dot" else real(name, *a, **k))


# --------------------------------------------------------------------- explain
EXPLAIN = "python -m fbackprop explain"


def test_explain_graphviz_engine_without_graphviz(no_graphviz, capsys, tmp_path):
    result = run(["explain", "--engine", "graphviz", "--out", str(tmp_path / "g.html")], capsys)
    assert_usage_error(result, EXPLAIN, "--engine graphviz", "Graphviz")
    assert not result[1], "nothing is computed or printed before the error"


def test_explain_png_without_graphviz_names_the_formats(no_graphviz, capsys, tmp_path):
    result = run(["explain", "--out", str(tmp_path / "x.png")], capsys)
    assert_usage_error(result, EXPLAIN, ".png", ".html, .svg, .dot or .txt")
    assert not result[1], "the table is not printed before the error"


def test_explain_unknown_format(capsys, tmp_path):
    result = run(["explain", "--out", str(tmp_path / "x.pdf")], capsys)
    assert_usage_error(result, EXPLAIN, "x.pdf", ".html")


@pytest.mark.parametrize("argv", [["--x", "abc"], ["--bogus"], ["--engine", "dot"]])
def test_explain_argparse_mistakes(argv, capsys):
    assert_usage_error(run(["explain", *argv], capsys), EXPLAIN)


def test_explain_out_creates_folders(capsys, tmp_path):
    path = tmp_path / "missing" / "dir" / "x.html"
    code, out, _ = run(["explain", "--out", str(path), "--engine", "builtin"], capsys)
    assert code == 0 and path.exists() and "<svg" in path.read_text()
    assert str(path) in out


def test_explain_out_folder_that_cannot_be_made(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = run(["explain", "--out", str(blocker / "x.html")], capsys)
    assert_usage_error(result, EXPLAIN, "--out")


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc")
def test_explain_out_that_cannot_be_written(capsys):
    # /proc accepts no new files, whatever the permission bits say (and root passes
    # every os.access check): the error comes from trying, before anything runs.
    result = run(["explain", "--out", "/proc/fbackprop_explain.html"], capsys)
    assert_usage_error(result, EXPLAIN, "--out", "/proc/fbackprop_explain.html",
                       "cannot write")
    assert not result[1], "nothing is computed or printed before the error"


def test_output_path_check_leaves_files_as_they_were(tmp_path):
    from fbackprop._src.cli import ArgumentParser, check_output_dir, check_output_path
    parser = ArgumentParser(prog="p")
    existing = tmp_path / "kept.txt"
    existing.write_text("content")
    assert check_output_path(parser, "--out", str(existing)) == str(existing)
    assert existing.read_text() == "content"
    new = tmp_path / "sub" / "new.json"
    check_output_path(parser, "--out", str(new))
    assert not new.exists() and new.parent.is_dir()      # the folder is made, no file left
    check_output_dir(parser, "--out", str(tmp_path / "d"))
    assert os.listdir(tmp_path / "d") == []


def test_explain_png_with_graphviz(tmp_path, monkeypatch):
    if explain_cli.shutil.which("dot") is None:
        pytest.skip("Graphviz is not installed")
    ex = explain(explain_cli.seed_example, 2.0, 3.0)
    path = ex.save(str(tmp_path / "sub" / "g.png"))
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------ demo
DEMO = "python -m fbackprop demo"


@pytest.mark.parametrize("argv,words", [
    (["--epochs", "0"], ["--epochs", "at least 1"]),
    (["--batch-size", "0"], ["--batch-size"]),
    (["--batch-size", "100000"], ["--batch-size", "training images"]),
    (["--hidden", "0"], ["--hidden"]),
    (["--lr", "0"], ["--lr", "positive"]),
    (["--target", "1.5"], ["--target", "between 0 and 1"]),
    (["--seed", "-1"], ["--seed"]),
    (["--epochs", "x"], ["--epochs", "invalid int"]),
])
def test_demo_mistakes(argv, words, capsys):
    assert_usage_error(run(["demo", *argv], capsys), DEMO, *words)


def test_demo_out_is_a_file(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert_usage_error(run(["demo", "--out", str(blocker)], capsys), DEMO, "--out", "file")


def test_demo_help_is_plain_with_defaults(capsys):
    code, out, _ = run(["demo", "--help"], capsys)
    assert code == 0
    assert "``" not in out and "`" not in out
    for text in ("(default: 20)", "(default: 64)", "(default: 256)", "(default: 0.97)",
                 "(default: out)", "(default: 0)"):
        assert text in out, text


def test_demo_prints_the_target_as_given(capsys, tmp_path):
    code, out, _ = run(["demo", "--epochs", "1", "--hidden", "8", "--target", "0.999",
                        "--no-progress", "--out", str(tmp_path)], capsys)
    assert code == 1                              # not reached in one epoch
    assert "target >= 0.999: NOT reached" in out


# ----------------------------------------------------------------------- bench
BENCH = "python -m fbackprop bench"


@pytest.mark.parametrize("argv,words", [
    (["--reps", "0"], ["--reps"]),
    (["--reps", "x"], ["--reps"]),
    (["--only", "no_such_workload"], ["no_such_workload"]),
])
def test_bench_mistakes(argv, words, capsys):
    assert_usage_error(run(["bench", *argv], capsys), BENCH, *words)


def test_bench_json_under_a_file(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = run(["bench", "--quick", "--json", str(blocker / "b.json")], capsys)
    assert_usage_error(result, BENCH, "--json")


def _fake_doc(quick):
    figures = {}
    for name in FIGURES:
        unit = {"flops": "FLOP", "temp_bytes": "B"}.get(name, "s")
        figures[name] = dict(fb=2.0, jax=1.0, unit=unit, ratio=2.0, target=1.0, passed=False)
    return {"meta": {"quick": quick, "total_seconds": 1.0},
            "workloads": [{"name": "mlp", "figures": figures, "errors": {}}]}


def test_bench_quick_table_gives_times_no_verdict():
    quick = bench_report.table(_fake_doc(quick=True))
    assert "smoke-test numbers" in quick.splitlines()[-1]
    time_rows = [line for line in quick.splitlines()
                 if any(label in line for label in ("jitted step", "trace only", "trace+lower",
                                                    "eager"))]
    assert time_rows and not any("MISS" in r or "PASS" in r for r in time_rows)
    assert "0 PASS, 2 MISS, 0 ERROR on FLOPs and temp bytes" in quick
    assert "smoke-test numbers" in bench_report.header(
        {"fbackprop_version": "0", "jax_version": "0", "jaxlib_version": "0", "date": "d",
         "platform": "cpu", "device_kind": "cpu", "device_count": 1, "cpu_model": "x",
         "cpu_count": 2, "cpus_usable": 2, "python": "3"}, quick=True)
    full = bench_report.table(_fake_doc(quick=False))
    assert f"0 PASS, {len(FIGURES)} MISS" in full and "smoke" not in full


def test_bench_memplan_out_that_cannot_be_made(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = run(["bench", "--memplan", "--quick", "--out", str(blocker)], capsys)
    assert_usage_error(result, "python -m fbackprop bench --memplan", "--out", "file")
    assert "memory-budget benchmark" not in result[1], "the error comes before the run"


def test_bench_help_states_the_quick_run_time(capsys):
    code, out, _ = run(["bench", "--help"], capsys)
    assert code == 0
    options = out[out.index("\n  --quick"):]
    quick = " ".join(options[:options.index("\n  --only")].split())
    assert "minute" in quick and "warm-up" in quick, quick


# ------------------------------------------------------------------ dispatcher
def test_unknown_subcommand_is_one_line(capsys):
    assert_usage_error(run(["frobnicate"], capsys), "python -m fbackprop", "frobnicate")


@pytest.mark.parametrize("flag", ["--version", "-V"])
def test_version(flag, capsys):
    import jax

    import fbackprop
    code, out, err = run([flag], capsys)
    assert code == 0 and not err
    assert out.strip().startswith(f"fbackprop {fbackprop.__version__} (jax {jax.__version__}")
    assert "--version" in cli.usage()


# ------------------------------------------------------- as a user sees it
@pytest.mark.parametrize("argv", [
    ["demo", "--epochs", "0"], ["explain", "--out", "x.pdf"],
    pytest.param(["explain", "--out", "/proc/fbackprop_x.html"], marks=pytest.mark.skipif(
        not os.path.isdir("/proc/self"), reason="needs Linux's /proc"))])
def test_real_command_prints_one_line(argv, tmp_path):
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "src"), JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "fbackprop", *argv], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines()
             if not line[:1] in ("W", "I") or ": error: " in line]   # absl log lines
    assert len(lines) == 1 and ": error: " in lines[0], proc.stderr
    assert not os.listdir(tmp_path), "a usage error writes nothing"


def test_real_version_command():
    import fbackprop
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "src"), JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "fbackprop", "--version"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"fbackprop {fbackprop.__version__} ")
