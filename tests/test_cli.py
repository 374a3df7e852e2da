import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipelines import progress
from pipelines.cli import cli

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def run(*args, warehouse=None):
    prefix = ["-w", str(warehouse)] if warehouse is not None else []
    return CliRunner().invoke(cli, prefix + [str(a) for a in args])


@pytest.mark.parametrize("name", sorted(cli.commands))
def test_every_command_is_documented_with_an_example(name):
    help_text = run(name, "--help").output
    assert "Example:" in help_text
    assert f"ew {name}" in README


def test_ingest_json_summary_then_log_and_models(tmp_path, tiny_bert_dir):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"id": i, "text": f"text {i}", "topic": "t"}) + "\n" for i in range(5)))
    result = run("ingest", corpus, "--model", tiny_bert_dir, "--json", warehouse=tmp_path / "wh")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)  # stdout is data; what ew is doing goes to stderr
    assert result.stderr.startswith(f"exporting {tiny_bert_dir.name} (2 layers, dim 32) to ONNX once for this warehouse")
    for key in ("read", "new_documents", "embedded", "reused", "duplicates", "rejected", "truncated", "seconds", "version"):
        assert key in summary
    assert (summary["read"], summary["embedded"], summary["version"]) == (5, 5, 1)
    log = run("log", warehouse=tmp_path / "wh").output.splitlines()
    assert log[0].split()[:2] == ["version", "committed"]
    assert re.match(r"\s+0\s+\S+ \S+\s+register-model", log[1]) and re.match(r"\s+1\s+\S+ \S+\s+ingest\s+\d+", log[2])
    models = run("models", warehouse=tmp_path / "wh")
    assert summary["model"] in models.output
    human = run("ingest", corpus, "--model", tiny_bert_dir, warehouse=tmp_path / "wh")
    assert "embedded 0, reused 5" in human.output and human.stderr == ""


def test_quiet_ingest_prints_no_progress(tmp_path, tiny_bert_dir):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"id": 1, "text": "fine"}\n')
    result = run("ingest", corpus, "--model", tiny_bert_dir, "--quiet", warehouse=tmp_path / "wh")
    assert result.exit_code == 0 and result.stderr == ""


def test_log_prints_rows_as_sqlite_utils_does(warehouse_copy):
    entries = [entry.to_dict() for entry in warehouse_copy.log()]
    as_json = run("log", "--json", warehouse=warehouse_copy.root)
    assert json.loads(as_json.stdout) == entries  # one array, with each version's pins
    assert entries[-1]["pins"]["embeddings"] >= 0
    assert run("log", "--format", "json", warehouse=warehouse_copy.root).stdout == as_json.stdout
    nl = run("log", "--nl", warehouse=warehouse_copy.root)
    assert [json.loads(line) for line in nl.stdout.splitlines()] == entries
    csv = run("log", "--csv", warehouse=warehouse_copy.root).stdout.splitlines()
    assert csv[0] == '"version","committed_at","operation","rows_added","detail","pins"' and len(csv) == len(entries) + 1
    table = run("log", warehouse=warehouse_copy.root).stdout.splitlines()
    assert "pins (documents/embeddings/models/heads/token_states)" in table[0]
    both = run("log", "--json", "--csv", warehouse=warehouse_copy.root)
    assert both.exit_code == 2 and both.stderr.endswith("Error: choose one output format, not csv and json\n")


@pytest.mark.parametrize("command", [["models"], ["models", "--available"], ["heads"]])
def test_row_commands_print_json_arrays(fitted_copy, command):
    listed = run(*command, "--json", warehouse=fitted_copy.root)
    assert listed.exit_code == 0, listed.output
    rows = json.loads(listed.stdout)
    assert isinstance(rows, list) and rows and all(isinstance(row, dict) for row in rows)
    nl = run(*command, "--nl", warehouse=fitted_copy.root)
    assert [json.loads(line) for line in nl.stdout.splitlines()] == rows


@pytest.mark.parametrize("existed", [False, True])
def test_a_failed_first_ingest_leaves_no_warehouse(tmp_path, existed):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"id": 1, "text": "fine"}\n')
    root = tmp_path / "wh"
    if existed:
        root.mkdir()
    missing = run("ingest", corpus, "--model", "nobody/none", warehouse=root)
    assert missing.exit_code == 1 and missing.stderr.startswith("Error: model 'nobody/none' not found")
    assert (list(root.iterdir()) == []) if existed else not root.exists()


def test_errors_are_one_line_and_exit_1(tmp_path, tiny_bert_dir):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"id": 1, "text": "fine"}\n{"id": 2}\n')
    result = run("ingest", corpus, "--model", tiny_bert_dir, "--quiet", warehouse=tmp_path / "wh")
    assert result.exit_code == 1
    assert result.stderr == f"Error: {corpus}, line 2: no 'text' field (choose another with --text-field); fix the line, or pass --on-error skip to skip such lines and write them to a rejects file\n"
    missing = run("ingest", corpus, "--model", "nobody/none", warehouse=tmp_path / "wh")
    assert missing.exit_code == 1 and missing.stderr.startswith("Error: model 'nobody/none' not found (looked in: ")
    debug = CliRunner().invoke(cli, ["--debug", "-w", str(tmp_path / "nowhere"), "log"])
    assert debug.exit_code == 1 and "Traceback" in debug.stderr and "Error: no warehouse at" in debug.stderr


def test_fit_head_heads_and_predict_from_the_command_line(fitted_copy, labelled_corpus, tmp_path):
    fit = run("fit-head", "--label", "section", "--epochs", "2", "--name", "cli-head", "--json", warehouse=fitted_copy.root)
    assert fit.exit_code == 0, fit.output
    summary = json.loads(fit.stdout)
    assert summary["head"] == "cli-head" and summary["train"] > 0 and summary["report"].endswith("report.png")
    heads = run("heads", warehouse=fitted_copy.root)
    assert "cli-head" in heads.output
    out = tmp_path / "p.parquet"
    predicted = run("predict", "cli-head", labelled_corpus, "--output", out, warehouse=fitted_copy.root)
    assert predicted.exit_code == 0, predicted.output
    assert "wrote" in predicted.output and out.exists()
    unknown = run("predict", "nope", labelled_corpus, "--output", out, warehouse=fitted_copy.root)
    assert unknown.exit_code == 1 and unknown.stderr.startswith("Error: no head named 'nope'")
    bad_label = run("fit-head", "--label", "colour", "--quiet", warehouse=fitted_copy.root)
    assert bad_label.exit_code == 1 and "no label column 'colour'" in bad_label.stderr


def test_fit_head_shows_its_epochs_on_stderr(fitted_copy, monkeypatch):
    monkeypatch.setattr(progress, "LOG_EVERY", 0.0)  # a log line at every epoch, as a long run would print
    fit = run("fit-head", "--label", "section", "--head", "linear", "--epochs", "2", "--patience", "0",
              "--name", "shown", warehouse=fitted_copy.root)
    assert fit.exit_code == 0, fit.output
    lines = fit.stderr.splitlines()  # one per epoch, and the last figures
    assert [line.split(" epochs in ")[0] for line in lines] == ["fit-head shown: 1", "fit-head shown: 2", "fit-head shown: 2"]
    assert "  epoch 1: validation accuracy " in lines[0] and "  epoch 2: validation accuracy " in lines[-1]
    assert "head shown:" in fit.stdout
    quiet = run("fit-head", "--label", "section", "--head", "linear", "--epochs", "2", "--name", "quiet", "--quiet",
                warehouse=fitted_copy.root)
    assert quiet.exit_code == 0 and quiet.stderr == ""
