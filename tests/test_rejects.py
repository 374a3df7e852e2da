import json
from pathlib import Path

import pytest

from pipelines.corpus import read_corpus
from pipelines.head_catalog import list_heads
from pipelines.prediction import predict
from pipelines.rejects import ON_ERROR, Rejects, check_on_error
from pipelines.errors import InputError
from warehouse import EwError

LINES = '{"id": 1, "text": "good"}\n[1]\n{"id": 3, "text": "good too"}\n{"id": 4}\n'


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text(LINES)
    return path


def test_on_error_values_are_checked():
    assert [check_on_error(value) for value in ON_ERROR] == ["fail", "skip"]
    with pytest.raises(EwError, match=r"^--on-error must be one of fail, skip, not 'ignore'$"):
        check_on_error("ignore")
    with pytest.raises(EwError, match="--on-error must be one of"):
        Rejects(Path("c.jsonl"), Path("r.jsonl"), on_error="Skip")


def test_fail_raises_on_the_first_bad_line_and_writes_nothing(corpus, tmp_path):
    rejects = Rejects(corpus, tmp_path / "out" / "r.jsonl", on_error="fail")
    records = rejects.filter(read_corpus(corpus))
    assert next(records).id == "1"
    with pytest.raises(InputError) as raised:
        next(records)
    assert (raised.value.line, raised.value.reason) == (2, "a JSON list, not an object")
    rejects.close()
    assert rejects.count == 0 and not (tmp_path / "out").exists()


def test_skip_counts_and_appends_bad_lines_to_a_new_folder(corpus, tmp_path):
    path = tmp_path / "new" / "folder" / "r.jsonl"
    advanced = []
    with Rejects(corpus, path, on_error="skip") as rejects:
        assert [r.id for r in rejects.filter(read_corpus(corpus), advanced.append)] == ["1", "3"]
    assert (rejects.count, advanced, rejects.path) == (2, [1, 1], path)
    written = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["file"], r["line"], r["raw"]) for r in written] == [(str(corpus), 2, "[1]"), (str(corpus), 4, '{"id": 4}')]
    with Rejects(corpus, path, on_error="skip") as again:  # a second run appends
        list(again.filter(read_corpus(corpus)))
    assert len(path.read_text().splitlines()) == 4


def test_no_bad_line_no_file(tmp_path):
    clean = tmp_path / "clean.jsonl"
    clean.write_text('{"text": "fine"}\n')
    with Rejects(clean, tmp_path / "r.jsonl", on_error="skip") as rejects:
        assert len(list(rejects.filter(read_corpus(clean)))) == 1
    assert rejects.count == 0 and not (tmp_path / "r.jsonl").exists()


def test_an_unwritable_place_is_a_clear_error(corpus, tmp_path):
    (tmp_path / "a-file").write_text("")
    path = tmp_path / "a-file" / "r.jsonl"  # its parent is a file: no folder can be made there
    rejects = Rejects(corpus, path, on_error="skip")
    with pytest.raises(EwError) as raised:
        list(rejects.filter(read_corpus(corpus)))
    message = str(raised.value)  # the middle is the system's reason, e.g. "(File exists)"
    assert message.startswith(f"cannot write the rejects file {path} (")
    assert message.endswith(f") for the bad lines of {corpus}; free some space there or choose a writable place with --rejects")
    rejects.close()


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full, a device that is always full")
def test_a_full_disk_is_a_clear_error(corpus):
    rejects = Rejects(corpus, Path("/dev/full"), on_error="skip")
    with pytest.raises(EwError, match=r"^cannot write the rejects file /dev/full \(No space left on device\)"):
        with rejects:
            list(rejects.filter(read_corpus(corpus)))


def test_the_corpus_file_cannot_be_its_own_rejects_file(corpus):
    # Appending rejects to the file being read would feed them back in without end.
    with pytest.raises(EwError, match="is the corpus file itself"):
        Rejects(corpus, corpus.parent / "." / corpus.name, on_error="skip")


# -- predict applies the same policy --------------------------------------------------------------
def test_predict_checks_on_error_before_doing_anything(fitted_copy, corpus, tmp_path):
    [head] = list_heads(fitted_copy)
    before = fitted_copy.latest_version()
    with pytest.raises(EwError, match="^--on-error must be one of fail, skip, not 'ignore'$"):
        predict(fitted_copy, head.head, corpus_file=corpus, output=tmp_path / "p.parquet", on_error="ignore")
    assert fitted_copy.latest_version() == before and not (tmp_path / "p.parquet").exists()


def test_predict_skip_writes_a_rejects_file_next_to_the_output(fitted_copy, corpus, tmp_path):
    [head] = list_heads(fitted_copy)
    out = tmp_path / "p.parquet"
    result = predict(fitted_copy, head.head, corpus_file=corpus, output=out, on_error="skip")
    assert (result.rows, result.rejected, result.rejects_file) == (2, 2, str(tmp_path / "p.parquet.rejects.jsonl"))
    written = [json.loads(line) for line in Path(result.rejects_file).read_text().splitlines()]
    assert [r["line"] for r in written] == [2, 4]  # once, though predict reads the file twice
    elsewhere = tmp_path / "bad-lines.jsonl"
    again = predict(fitted_copy, head.head, corpus_file=corpus, output=out, on_error="skip", rejects_file=elsewhere)
    assert again.rejects_file == str(elsewhere) and len(elsewhere.read_text().splitlines()) == 2


def test_predict_fails_on_a_hostile_line_with_its_line_number(fitted_copy, tmp_path):
    [head] = list_heads(fitted_copy)
    hostile = tmp_path / "h.jsonl"
    hostile.write_text('{"text": "fine"}\n{"text": "x", "n": 123456789012345678901234567890}\n')
    with pytest.raises(InputError, match=r"h.jsonl, line 2: field 'n' holds the integer .* exceeds 64 bits"):
        predict(fitted_copy, head.head, corpus_file=hostile, output=tmp_path / "p.parquet")
    assert not (tmp_path / "p.parquet").exists()
