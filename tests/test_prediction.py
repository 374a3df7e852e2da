import json

import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from pipelines.fitting import list_heads
from pipelines.prediction import predict
from warehouse import EwError, HeadError


def test_predict_a_corpus_file_embeds_only_new_documents(fitted_copy, labelled_corpus, tmp_path):
    [head] = list_heads(fitted_copy)
    lines = labelled_corpus.read_text().splitlines()[:5]
    lines.append(json.dumps({"id": "brand-new", "text": "a brand new package description"}))
    corpus = tmp_path / "new.jsonl"
    corpus.write_text("\n".join(lines) + "\n")
    out = tmp_path / "predictions.parquet"
    result = predict(fitted_copy, head["head"], corpus_file=corpus, output=out)
    assert (result.rows, result.embedded, result.reused) == (6, 1, 5)
    table = pq.read_table(out)
    assert table.column_names[:4] == ["id", "doc_hash", "predicted_section", "probability"]
    assert table.column_names[4:] == [f"p_{c}" for c in head["classes"]]
    assert sorted(table.column("id").to_pylist()) == sorted(json.loads(line)["id"] for line in lines)


def test_predict_stored_documents_with_where_to_csv(fitted_copy, tmp_path):
    [head] = list_heads(fitted_copy)
    out = tmp_path / "p.csv"
    result = predict(fitted_copy, head["head"], where="section = 'python'", output=out)
    table = pacsv.read_csv(out)
    expected = fitted_copy.query("select count(*) from documents where section = 'python'").read_all().column(0)[0].as_py()
    assert result.rows == table.num_rows == expected and result.embedded == 0


def test_unknown_head_and_bad_output(fitted_copy, tmp_path):
    with pytest.raises(HeadError, match="no head named 'nope'"):
        predict(fitted_copy, "nope", where="true", output=tmp_path / "p.parquet")
    [head] = list_heads(fitted_copy)
    with pytest.raises(EwError, match=".parquet or .csv"):
        predict(fitted_copy, head["head"], where="true", output=tmp_path / "p.txt")
    assert not (tmp_path / "p.parquet").exists()
