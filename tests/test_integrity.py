"""`ew verify` (warehouse/integrity.py, pipelines/integrity.py): each kind of damage is found, said
where, and the other commands meet it with one `Error:` line that points to `ew verify`."""
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from click.testing import CliRunner

from pipelines.artifacts import CARD_FILE, MODEL_FILE, TOKENIZER_FILE
from pipelines.cli import cli
from pipelines.integrity import verify
from warehouse.integrity import check_tables
from warehouse.keys import doc_hash
from warehouse.tables import DOCUMENTS, EMBEDDINGS, HEADS, LOG, MODELS, vector_column


def run(warehouse, *args):
    return CliRunner().invoke(cli, ["-w", str(warehouse.root), *map(str, args)])


def live_file(wh, table: str) -> Path:
    """One Parquet file the latest version pins for ``table``."""
    if table == LOG:
        return Path(wh._open_delta(LOG).file_uris()[0])
    return Path(wh.delta_table(table, wh.snapshot()).file_uris()[0])


def commit_file(wh, table: str) -> Path:
    """The Delta commit file of the version the latest warehouse version pins (the newest for the log)."""
    version = wh._open_delta(LOG).version() if table == LOG else wh.snapshot().table_versions[table]
    return wh.root / table / "_delta_log" / f"{version:020d}.json"


def found(report) -> list[tuple[str, str]]:
    return [(problem.kind, problem.where) for problem in report.problems]


def model_dir(wh) -> Path:
    return wh.root / wh.models()[0].artifact


def head_dir(wh) -> Path:
    return wh.root / wh.heads()[0].artifact


# -- a sound warehouse ---------------------------------------------------------------------
def test_a_sound_warehouse_passes_every_check_and_counts_what_it_read(fitted):
    report = verify(fitted, deep=True)
    assert report.ok and report.problems == ()
    rows = {table: fitted.query(f"select count(*) as n from {table}").read_all().column("n")[0].as_py()
            for table in (DOCUMENTS, EMBEDDINGS, MODELS, HEADS)}
    versions = len(fitted.log())
    assert (report.version, report.tables, report.versions, report.models, report.heads) == (versions - 1, 5, versions, 1, 1)
    assert report.rows == sum(rows.values()) + versions  # the log holds one row per version
    files = sum(len(fitted.delta_table(t, fitted.snapshot()).file_uris()) for t in rows) + len(fitted._open_delta(LOG).file_uris())
    assert report.files == files


def test_an_empty_warehouse_is_sound(tmp_path):
    from warehouse import Warehouse

    report = verify(Warehouse.open(tmp_path / "wh", create=True), deep=True)
    assert report.ok and (report.version, report.tables, report.files) == (None, 0, 0)


# -- files and logs --------------------------------------------------------------------------
def test_a_deleted_data_file_is_named_with_its_rows(fitted_copy):
    path = live_file(fitted_copy, DOCUMENTS)
    path.unlink()
    report = verify(fitted_copy)
    assert found(report) == [("missing-file", str(path))]
    assert "a data file of the documents table, holding" in report.problems[0].what
    assert "restore it from a backup" in report.problems[0].fix


def test_a_truncated_parquet_file_is_found_by_its_footer(fitted_copy):
    path = live_file(fitted_copy, EMBEDDINGS)
    size = path.stat().st_size
    with open(path, "r+b") as handle:
        handle.truncate(size // 2)
    report = verify(fitted_copy)
    assert found(report) == [("damaged-file", str(path))]
    assert f"{size // 2:,} of its {size:,} bytes are left" in report.problems[0].what


def test_a_file_damaged_inside_is_found_only_by_deep(fitted_copy):
    path = live_file(fitted_copy, EMBEDDINGS)
    data = bytearray(path.read_bytes())
    data[100:len(data) // 2] = b"\x55" * (len(data) // 2 - 100)  # the footer at the end stays readable
    path.write_bytes(bytes(data))
    assert verify(fitted_copy).ok
    assert found(verify(fitted_copy, deep=True)) == [("damaged-file", str(path))]


@pytest.mark.parametrize("damage", ["truncated", "garbled"])
@pytest.mark.parametrize("table", [DOCUMENTS, LOG])
def test_a_damaged_delta_commit_is_named(fitted_copy, table, damage):
    path = commit_file(fitted_copy, table)
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:50])
    else:
        path.write_text("not json {\n")
    report = verify(fitted_copy, deep=True)
    assert found(report) == [("delta-log", str(path))]
    assert "this commit file is truncated or garbled" in report.problems[0].what
    if table == LOG:  # no pins to check against: the other tables are checked at their newest version
        assert report.version is None and report.tables == 4


def test_a_row_count_that_disagrees_with_the_delta_log(fitted_copy):
    import pyarrow.parquet as pq

    path = live_file(fitted_copy, DOCUMENTS)
    table = pq.read_table(path)
    pq.write_table(table.slice(0, 3), path)
    report = verify(fitted_copy)
    assert found(report) == [("row-count", str(path))]
    assert report.problems[0].what == f"the file holds 3 rows, the documents table's Delta log says {table.num_rows:,}"


def test_a_table_ahead_of_the_log_is_reported_until_the_next_writer_adopts_it(fitted_copy):
    with fitted_copy.writer() as writer:  # a writer that dies before its log commit
        writer.upsert_documents(pa.table({"corpus": ["extra"], "id": ["x"], "doc_hash": [doc_hash("hi")], "text": ["hi"]}))
    report = verify(fitted_copy)
    assert found(report) == [("ahead", str(fitted_copy.root / DOCUMENTS))]
    assert "adopts them in a 'recover' version" in report.problems[0].fix
    with fitted_copy.writer():
        pass
    assert verify(fitted_copy).ok


# -- artifacts -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", [MODEL_FILE, TOKENIZER_FILE])
def test_a_deleted_model_file_is_named(fitted_copy, name):
    path = model_dir(fitted_copy) / name
    path.unlink()
    assert found(verify(fitted_copy)) == [("model-artifact", str(path))]


def test_a_changed_model_file_breaks_its_digest(fitted_copy):
    path = model_dir(fitted_copy) / TOKENIZER_FILE
    path.write_text(path.read_text() + " ")
    report = verify(fitted_copy)
    assert found(report) == [("model-artifact", str(path))]
    assert "does not match the digest in its card" in report.problems[0].what


def test_a_card_without_digests_still_needs_its_files(fitted_copy):
    card_path = model_dir(fitted_copy) / CARD_FILE
    card = json.loads(card_path.read_text())
    assert card.pop("onnx_sha256") and card.pop("tokenizer_sha256")  # a card from before the digests
    card_path.write_text(json.dumps(card))
    (model_dir(fitted_copy) / TOKENIZER_FILE).write_text("{}")
    assert verify(fitted_copy).ok
    (model_dir(fitted_copy) / MODEL_FILE).unlink()
    assert found(verify(fitted_copy)) == [("model-artifact", str(model_dir(fitted_copy) / MODEL_FILE))]


def test_a_damaged_card_and_a_deleted_model_directory(fitted_copy):
    import shutil

    directory = model_dir(fitted_copy)
    (directory / CARD_FILE).write_text("{")
    report = verify(fitted_copy)
    assert found(report) == [("model-artifact", str(directory))]
    assert "model.json cannot be read as JSON" in report.problems[0].what
    shutil.rmtree(directory)
    report = verify(fitted_copy)
    assert found(report) == [("model-artifact", str(directory))]
    assert report.problems[0].what.endswith("is missing")


def test_a_tampered_head_card_is_found(fitted_copy):
    card_path = head_dir(fitted_copy) / "head.json"
    card = json.loads(card_path.read_text())
    card["classes"] = list(reversed(card["classes"]))
    card_path.write_text(json.dumps(card))
    report = verify(fitted_copy)
    assert found(report) == [("head-artifact", str(head_dir(fitted_copy)))]
    assert "does not match its digest" in report.problems[0].what


def test_head_files_of_another_head_are_not_the_registered_ones(fitted_copy):
    card_path = head_dir(fitted_copy) / "head.json"
    card = json.loads(card_path.read_text())
    row = fitted_copy.heads()[0]
    registered = json.loads(row.card)
    assert registered["digest"] == card["digest"]
    with fitted_copy.writer() as writer:  # the row now registers another digest for the same files
        writer.remove_head(row.head)
        writer.add_head(type(row)(**{**row.to_dict(), "classes": row.classes,
                                     "card": json.dumps({**registered, "digest": "0" * 64})}))
        writer.commit("test")
    report = verify(fitted_copy)
    assert found(report) == [("head-artifact", str(head_dir(fitted_copy)))]
    assert "are not the ones the heads table registered" in report.problems[0].what


# -- every row (deep) ------------------------------------------------------------------------
def embedding_rows(wh, *, width: int | None = None, layer: int | None = None, copies: int = 1) -> pa.Table:
    """Stored embeddings rows (the first one, ``copies`` times), optionally with another width or layer."""
    row = wh.query("select * from embeddings order by doc_hash, layer limit 1").read_all().to_pylist()[0]
    vector = np.zeros((copies, width or len(row["embedding"])), dtype=np.float32)
    return pa.table({
        "doc_hash": [row["doc_hash"]] * copies, "model": [row["model"]] * copies,
        "layer": pa.array([row["layer"] if layer is None else layer] * copies, pa.int32()),
        "pooling": [row["pooling"]] * copies, "embedding": vector_column(vector),
    })


def commit_embeddings(wh, rows: pa.Table) -> None:
    with wh.writer() as writer:
        writer.append_embeddings(rows)
        writer.commit("test")


def test_a_duplicate_key_is_found_only_by_deep(fitted_copy):
    commit_embeddings(fitted_copy, embedding_rows(fitted_copy))
    assert verify(fitted_copy).ok
    report = verify(fitted_copy, deep=True)
    assert found(report) == [("duplicate-key", str(fitted_copy.root / EMBEDDINGS))]
    assert report.problems[0].what.startswith("1 keys (doc_hash, model, layer, pooling) occur more than once, e.g. doc_hash=")


def test_a_wrong_vector_width_and_a_layer_out_of_range(fitted_copy):
    model = fitted_copy.models()[0]
    wide = embedding_rows(fitted_copy, width=model.dim + 1).set_column(0, "doc_hash", pa.array([doc_hash("unseen")]))
    deep_layer = embedding_rows(fitted_copy, layer=model.num_layers + 1)
    commit_embeddings(fitted_copy, pa.concat_tables([wide, deep_layer]))
    report = verify(fitted_copy, deep=True)
    where = str(fitted_copy.root / EMBEDDINGS)
    assert found(report) == [("vector-width", f"{where} (model={model.model}, layer={wide['layer'][0]})"),
                             ("layer-range", f"{where} (model={model.model}, layer={model.num_layers + 1})")]
    assert report.problems[0].what == f"1 vectors have {model.dim + 1} values, the model's dim is {model.dim}"


def test_a_doc_hash_that_is_not_the_hash_of_its_text(fitted_copy):
    with fitted_copy.writer() as writer:
        writer.upsert_documents(pa.table({"corpus": ["extra"], "id": ["x"], "doc_hash": [doc_hash("other")],
                                          "text": ["cafe\u0301"]}))
        writer.upsert_documents(pa.table({"corpus": ["extra"], "id": ["nfc"], "doc_hash": [doc_hash("caf\u00e9")],
                                          "text": ["cafe\u0301"]}))  # NFC makes them the same text: sound
        writer.commit("test")
    report = verify(fitted_copy, deep=True)
    assert found(report) == [("doc-hash", str(fitted_copy.root / DOCUMENTS))]
    assert report.problems[0].what.endswith("e.g. corpus='extra', id='x'")


def test_check_tables_alone_never_looks_at_artifacts(fitted_copy):
    (model_dir(fitted_copy) / MODEL_FILE).unlink()
    report = check_tables(fitted_copy)
    assert report.ok and (report.models, report.heads) == (0, 0)


# -- the command -----------------------------------------------------------------------------
def test_verify_prints_a_summary_and_exits_0_when_sound(fitted):
    result = run(fitted, "verify", "--deep")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"warehouse {fitted.root} (version {len(fitted.log()) - 1}) is sound: 5 tables, ")
    assert result.stdout.count("\n") == 1 and " checked row by row in " in result.stdout


def test_verify_prints_one_line_per_problem_and_exits_1(fitted_copy):
    data_file = live_file(fitted_copy, DOCUMENTS)
    data_file.unlink()
    (model_dir(fitted_copy) / MODEL_FILE).unlink()
    report = verify(fitted_copy)
    result = run(fitted_copy, "verify")
    assert result.exit_code == 1 and result.stderr == ""
    lines = result.stdout.splitlines()
    assert lines[:-1] == [problem.line() for problem in report.problems] and len(lines) == 3
    assert lines[0].startswith(f"{data_file}: a data file of the documents table, holding ")
    assert lines[-1].startswith(f"found 2 problems in warehouse {fitted_copy.root} (version ")

    as_json = run(fitted_copy, "verify", "--json")
    assert as_json.exit_code == 1
    data = json.loads(as_json.stdout)
    assert data["ok"] is False and [p["kind"] for p in data["problems"]] == ["missing-file", "model-artifact"]
    assert set(data["problems"][0]) == {"kind", "what", "where", "fix"}


VERIFY_HINT = "run `ew verify` to see what is wrong\n"


@pytest.mark.parametrize("command, table", [
    (["query", "select count(*) from documents"], DOCUMENTS),
    (["log"], LOG),
    (["models"], MODELS),
    (["heads"], HEADS),
    (["ingest", "CORPUS", "--model", "MODEL", "--corpus", "debian"], DOCUMENTS),
])
@pytest.mark.parametrize("damage", ["deleted data file", "truncated commit"])
def test_other_commands_meet_damage_with_one_error_line(fitted_copy, tmp_path, command, table, damage):
    corpus = tmp_path / "more.jsonl"
    corpus.write_text('{"id": "n1", "text": "one more text"}\n')
    command = [str(corpus) if arg == "CORPUS" else fitted_copy.models()[0].model if arg == "MODEL" else arg
               for arg in command]
    if damage == "deleted data file":
        path = live_file(fitted_copy, table)
        path.unlink()
        expected = (f"Error: cannot read the {table} table ({path} is missing); a data file is missing or damaged: "
                    + VERIFY_HINT)
    else:
        path = commit_file(fitted_copy, table)
        path.write_bytes(path.read_bytes()[:50])
        expected = None
    result = run(fitted_copy, *command)
    assert result.exit_code == 1, result.output
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.output
    if expected is not None:
        assert result.stderr == expected
    else:
        assert result.stderr.startswith("Error: cannot read ") and f"table at {fitted_copy.root / table} (" in result.stderr
        assert result.stderr.endswith("; its Delta log is missing or damaged: " + VERIFY_HINT)


def test_a_damaged_commit_past_the_pinned_version_is_named(fitted_copy):
    with fitted_copy.writer() as writer:  # an interrupted writer's commit, then damaged
        writer.upsert_documents(pa.table({"corpus": ["extra"], "id": ["x"], "doc_hash": [doc_hash("hi")], "text": ["hi"]}))
    path = fitted_copy.root / DOCUMENTS / "_delta_log" / f"{fitted_copy._open_delta(DOCUMENTS).version():020d}.json"
    path.write_text("{")
    report = verify(fitted_copy, deep=True)
    assert found(report) == [("delta-log", str(path))]
    assert report.problems[0].what.startswith("the documents table cannot be read at its newest version: ")
