"""The command line: stdout carries the result path, stderr one line per problem, exit codes as documented."""

from __future__ import annotations

import os
import subprocess
import sys

import ir_measures
import pytest
import torch

from tiny_knn.cli import main


def test_success_prints_only_the_path(pair, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    q_path, d_path = pair(torch.randn(5, 8), torch.randn(100, 8))
    out = str(tmp_path / "result.pt")
    assert main([q_path, d_path, "--k", "10", "--cpu", "--output-path", out, "--quiet"]) == 0
    captured = capsys.readouterr()
    assert captured.out == out + "\n" and captured.err == ""
    assert torch.load(out)["indices"].shape == (5, 10)


def test_default_k_and_path(pair, capsys) -> None:  # type: ignore[no-untyped-def]
    q_path, d_path = pair(torch.randn(2, 4), torch.randn(3000, 4))
    assert main([q_path, d_path, "--cpu"]) == 0
    captured = capsys.readouterr()
    expected = os.path.join(os.path.dirname(q_path), "top2000_queries_x_docs.pt")
    assert captured.out.strip() == expected
    assert torch.load(expected)["k"] == 2000
    assert "docs" in captured.err  # the progress bar, on stderr


def test_k_above_docs_warns_in_one_line(pair, capsys) -> None:  # type: ignore[no-untyped-def]
    assert main([*pair(torch.randn(2, 4), torch.randn(5, 4)), "--k", "9", "--cpu"]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert warnings == [
        "tiny-knn: warning: k=9 is more than the 5 docs in docs file '" + warnings[0].split("'")[1] + "'; returning k=5"
    ]


def test_help_explains_every_option(capsys) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    flat = " ".join(text.split())
    for option in (
        *("--k", "--cpu", "--output-path", "--max-memory", "--batch-size", "--chunk-size", "--quiet", "demo"),
        *("--metric", "--exclude-self", "--format", "--query-ids", "--doc-ids", "--dry-run", "--exclude-pairs"),
        *("tiny-knn merge", "tiny-knn recall", "tiny-knn dedup", "ivecs", "bigann", "--min-score", "--max-distance"),
    ):
        assert option in flat
    assert "2000" in text
    assert "(default: None)" not in flat and "(default: False)" not in flat  # no default said twice, or as None
    assert "never replaces an input" in flat and "OUT.lock" in flat


def bad_inputs(tmp_path, save):  # type: ignore[no-untyped-def]
    good = save(torch.randn(4, 3), "good.pt")
    docs = save(torch.randn(20, 3), "docs.pt")
    nan_docs = torch.randn(20, 3)
    nan_docs[13, 0] = float("nan")
    truncated = str(tmp_path / "truncated.pt")
    with open(docs, "rb") as whole, open(truncated, "wb") as part:
        part.write(whole.read()[:300])
    (tmp_path / "junk.pt").write_bytes(os.urandom(200))
    empty = tmp_path / "empty-folder"
    empty.mkdir()
    return {
        "missing": ([str(tmp_path / "missing.pt"), docs], "no such file"),
        "directory": ([str(empty), docs], "holds no .pt"),
        "truncated": ([good, truncated], "not a PyTorch zip archive"),
        "junk": ([good, str(tmp_path / "junk.pt")], "not a PyTorch zip archive"),
        "dict": ([save({"a": 1}, "dict.pt"), docs], "holds a dict"),
        "1-d": ([save(torch.randn(3), "vector.pt"), docs], "expected 2-D"),
        "int": ([save(torch.arange(6).reshape(2, 3), "int.pt"), docs], "dtype int64"),
        "complex": ([save(torch.randn(2, 3, dtype=torch.complex64), "c.pt"), docs], "dtype complex64"),
        "dims": ([save(torch.randn(2, 5), "q5.pt"), docs], "dim 5.*dim 3"),
        "empty": ([save(torch.randn(0, 3), "none.pt"), docs], "at least one row"),
        "nan-docs": ([good, save(nan_docs, "nan.pt")], "row 13 holds NaN or Inf"),
        "inf-queries": ([save(torch.tensor([[1.0, 2, 3], [float("inf"), 0, 0]]), "inf.pt"), docs], "row 1 holds NaN"),
        "no-dir": ([good, docs, "--output-path", str(tmp_path / "nowhere" / "r.pt")], "does not exist"),
        "out-is-dir": ([good, docs, "--output-path", str(tmp_path)], "is a directory"),
        "budget": ([good, docs, "--max-memory", "1KB"], "too small"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "missing", "directory", "truncated", "junk", "dict", "1-d", "int", "complex", "dims", "empty",
        "nan-docs", "inf-queries", "no-dir", "out-is-dir", "budget",
    ],
)  # fmt: skip
def test_bad_input_exits_2_with_one_line_and_leaves_nothing(tmp_path, save, capsys, case) -> None:  # type: ignore[no-untyped-def]
    argv, message = bad_inputs(tmp_path, save)[case]
    before = set(os.listdir(tmp_path))
    assert main([*argv, "--k", "3", "--cpu", "--quiet"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tiny-knn: error: ")
    import re

    assert re.search(message, lines[0]), lines[0]
    assert set(os.listdir(tmp_path)) == before  # no result, no temporary file


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions, so this cannot be provoked")
def test_unwritable_output_folder(pair, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    q_path, d_path = pair(torch.randn(2, 3), torch.randn(5, 3))
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        assert main([q_path, d_path, "--k", "1", "--output-path", str(locked / "r.pt")]) == 2
        assert "not writable" in capsys.readouterr().err
    finally:
        locked.chmod(0o700)


@pytest.mark.parametrize(
    "argv", [["--k", "0"], ["--k", "-1"], ["--k", "x"], ["--max-memory", "lots"], ["--batch-size", "0"]]
)
def test_bad_options_exit_2(pair, capsys, argv) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(SystemExit) as exit_info:
        main([*pair(torch.randn(2, 3), torch.randn(5, 3)), *argv])
    assert exit_info.value.code == 2


def test_unexpected_failure_exits_1_in_one_line(pair, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    import tiny_knn.engine

    monkeypatch.setattr(tiny_knn.engine, "search", lambda *a, **k: 1 / 0)
    monkeypatch.delenv("TINY_KNN_DEBUG", raising=False)
    assert main([*pair(torch.randn(2, 3), torch.randn(5, 3)), "--k", "1", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("tiny-knn: unexpected failure: ZeroDivisionError") and "Traceback" not in err


def test_module_runs_as_a_process(pair, tmp_path) -> None:  # type: ignore[no-untyped-def]
    q_path, d_path = pair(torch.randn(6, 8), torch.randn(300, 8))
    out = str(tmp_path / "r.pt")
    done = subprocess.run(
        [sys.executable, "-m", "tiny_knn", q_path, d_path, "--k", "7", "--cpu", "--output-path", out],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == out + "\n"
    assert torch.load(out)["indices"].shape == (6, 7)
    bad = subprocess.run(
        [sys.executable, "-m", "tiny_knn", str(tmp_path / "missing.pt"), d_path], capture_output=True, text=True
    )
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "no such file" in bad.stderr


def test_demo_verifies_itself(tmp_path) -> None:  # type: ignore[no-untyped-def]
    done = subprocess.run(
        [sys.executable, "-m", "tiny_knn", "demo", "--docs", "3000", "--queries", "50", "--dim", "32", "--k", "10"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert "OK" in done.stdout and "peak memory" in done.stdout


def test_dry_run_prints_the_plan_and_writes_nothing(pair, capsys) -> None:  # type: ignore[no-untyped-def]
    q_path, d_path = pair(torch.randn(10, 8), torch.randn(500, 8))
    before = set(os.listdir(os.path.dirname(q_path)))
    assert main([q_path, d_path, "--k", "5", "--cpu", "--dry-run", "--batch-size", "4"]) == 0
    text = capsys.readouterr().out
    assert "device cpu" in text and "docs read 3 times" in text and "x 3 pass(es)" in text
    assert set(os.listdir(os.path.dirname(q_path))) == before


def test_self_search_to_a_trec_run_with_ids(tmp_path, save, capsys) -> None:  # type: ignore[no-untyped-def]
    points = save(torch.randn(30, 6), "points.pt")
    (tmp_path / "ids.txt").write_text("".join(f"p{row}\n" for row in range(30)))
    argv = [points, points, "--k", "5", "--cpu", "--metric", "l2", "--exclude-self", "--format", "trec", "--quiet"]
    assert main([*argv, "--query-ids", str(tmp_path / "ids.txt"), "--doc-ids", str(tmp_path / "ids.txt")]) == 0
    path = capsys.readouterr().out.strip()
    assert path == str(tmp_path / "top5_points_x_points.trec")
    run = list(ir_measures.read_trec_run(path))
    assert len(run) == 150 and all(line.query_id != line.doc_id for line in run)
    assert {line.query_id for line in run} == {f"p{row}" for row in range(30)}


def test_exclude_self_needs_the_same_file(pair, capsys) -> None:  # type: ignore[no-untyped-def]
    q_path, d_path = pair(torch.randn(5, 4), torch.randn(5, 4))
    assert main([q_path, d_path, "--k", "2", "--cpu", "--exclude-self"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "expected the same file for both" in err


def test_dry_run_names_the_metric(pair, capsys) -> None:  # type: ignore[no-untyped-def]
    _, d_path = pair(torch.randn(10, 8), torch.randn(500, 8))
    assert main([d_path, d_path, "--k", "5", "--cpu", "--dry-run", "--metric", "l2", "--exclude-self"]) == 0
    text = capsys.readouterr().out
    assert "metric l2, excluding each query's own row" in text and "scores: exact" in text


def test_the_console_script_is_installed_and_runs(pair, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from importlib.metadata import entry_points

    (script,) = [entry for entry in entry_points(group="console_scripts") if entry.name == "tiny-knn"]
    assert script.value == "tiny_knn.cli:console_main"
    q_path, d_path = pair(torch.randn(3, 8), torch.randn(20, 8))
    out = str(tmp_path / "script.pt")
    finished = subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "tiny-knn"), q_path, d_path, "--k", "4", "--quiet",
         "--output-path", out],
        capture_output=True, text=True,
    )  # fmt: skip
    assert finished.returncode == 0, finished.stderr
    assert finished.stdout.strip() == out and torch.load(out)["indices"].shape == (3, 4)
