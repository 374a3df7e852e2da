import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from pipelines.cli import cli
from warehouse.errors import EwError
from warehouse.splits import SplitSpec


def run(*args, warehouse):
    return CliRunner().invoke(cli, ["-w", str(warehouse.root)] + [str(a) for a in args])


def labelled_pairs(warehouse, where="true"):
    return warehouse.query(
        f"select count(*) from (select distinct doc_hash, section from documents where section is not null and {where})"
    ).read_all().column(0)[0].as_py()


def test_schema_is_a_fixed_size_list_and_splits_follow_split_spec(ingested):
    model = ingested.models()[0]
    table = ingested.training_set(label="section", layer=1, spec=SplitSpec(seed=3)).read_all()
    assert table.schema.names == ["doc_hash", "section", "split", "embedding"]
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), model.dim)
    assert table.num_rows == labelled_pairs(ingested)
    spec = SplitSpec(seed=3)
    assert table.column("split").to_pylist() == [spec.split_of(h) for h in table.column("doc_hash").to_pylist()]
    assert table.schema.metadata[b"ew.layer"] == b"1" and table.schema.metadata[b"ew.seed"] == b"3"
    x = np.asarray(table.column("embedding").combine_chunks().flatten()).reshape(-1, model.dim)
    assert x.shape == (table.num_rows, model.dim)


def test_vectors_are_the_stored_ones(ingested):
    table = ingested.training_set(label="section", split="test", corpus="debian", where="priority = 'optional'").read_all()
    assert set(table.column("split").to_pylist()) == {"test"}
    one = table.slice(0, 1).to_pylist()[0]
    stored = ingested.query(
        f"select embedding from embeddings where doc_hash = '{one['doc_hash']}' and layer = 2"
    ).read_all().column(0)[0].as_py()
    assert one["embedding"] == pytest.approx(stored)


def test_cli_export_writes_parquet_in_place(ingested, tmp_path):
    output = tmp_path / "train.parquet"
    result = run("export", "--label", "section", "--split", "train", "--seed", 1, "--output", output, warehouse=ingested)
    assert result.exit_code == 0, result.output
    table = pq.read_table(output)
    dim = ingested.models()[0].dim
    version = ingested.snapshot().version
    assert result.output == (f"wrote {table.num_rows:,} rows (fixed_size_list<item: float>[{dim}]) to {output} "
                             f"(warehouse version {version})\n")
    assert set(table.column("split").to_pylist()) == {"train"}
    spec = SplitSpec(seed=1)
    assert all(spec.split_of(h) == "train" for h in table.column("doc_hash").to_pylist())
    assert [p.name for p in tmp_path.iterdir()] == ["train.parquet"]  # no temporary file left beside it


@pytest.mark.parametrize("args, error", [
    (["--label", "colour"], "Error: documents has no label column 'colour'; fields you can use: "),
    (["--label", "section", "--layer", "9"], "Error: --layer 9 does not exist; model {model} has layers 0..2"),
    (["--label", "section", "--split-sizes", "80,30,10"],
     "Error: --split must be three whole percentages that add up to 100 with train > 0, got 80,30,10"),
])
def test_cli_export_errors(ingested, tmp_path, args, error):
    output = tmp_path / "x.parquet"
    result = run("export", *args, "--output", output, warehouse=ingested)
    assert result.exit_code == 1
    assert result.output.startswith(error.format(model=ingested.models()[0].model))
    assert result.output.count("\n") == 1
    assert not output.exists()


def test_an_unknown_model_key_lists_the_registered_ones(ingested):
    with pytest.raises(EwError, match="model 'nope' is not registered at warehouse version"):
        ingested.training_set(label="section", model="nope")


def test_a_key_prefix_selects_the_model_and_a_bad_split_is_refused(ingested):
    key = ingested.models()[0].model
    table = ingested.training_set(label="section", model=key[:6], layer=0, split="val").read_all()
    assert table.schema.metadata[b"ew.model"] == key.encode() and set(table.column("split").to_pylist()) == {"val"}
    with pytest.raises(EwError, match="--split must be one of train, val, test, all, got 'dev'"):
        ingested.training_set(label="section", split="dev")
