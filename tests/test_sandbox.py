"""Hostile SQL against `ew query`: each statement is refused with one `Error:` line and writes nothing."""
import os

import pytest
from click.testing import CliRunner

from pipelines.cli import cli

# {outside} is a folder next to the warehouse holding passwd.csv.
HOSTILE = {
    "files": [
        "select * from read_csv('{outside}/passwd.csv')",
        "select * from read_csv_auto('/etc/passwd')",
        "select * from read_parquet('{outside}/x.parquet')",
        "select * from parquet_scan('{outside}/x.parquet')",
        "select * from parquet_metadata('{outside}/x.parquet')",
        "select * from read_json('{outside}/x.json')",
        "select * from read_ndjson_objects('/etc/hosts')",
        "select * from read_text('/etc/passwd')",
        "select * from read_blob('/etc/passwd')",
        "select * from sniff_csv('/etc/passwd')",
        "select * from glob('{outside}/*')",
        "select * from '{outside}/passwd.csv'",
        'select * from "READ_CSV"(\'/etc/passwd\')',
        "select * from `Read_Csv`('/etc/passwd')",
        "select * from read_csv /* a comment */ ('/etc/passwd')",
        "with t as (select * from read_csv('/etc/passwd')) select * from t",
        "select (select count(*) from read_csv('/etc/passwd'))",
        "select * from documents where id in (select file from glob('/etc/*'))",
    ],
    "network": [
        "select * from read_csv('https://example.com/data.csv')",
        "select * from read_parquet('s3://bucket/x.parquet')",
        "select * from 'https://example.com/x.parquet'",
        "select * from read_json('http://169.254.169.254/latest/meta-data')",
    ],
    "copy, export, attach": [
        "copy (select 1) to '{outside}/out.csv'",
        "copy documents to '{outside}/documents.parquet' (format parquet)",
        "copy documents from '{outside}/passwd.csv'",
        "export database '{outside}/export'",
        "import database '{outside}'",
        "attach '{outside}/other.db' as other",
        "attach ':memory:' as scratch",
        "detach memory",
        "use memory",
    ],
    "extensions": [
        "install httpfs",
        "load httpfs",
        "force install httpfs from 'http://example.com'",
    ],
    "settings": [
        "set enable_external_access = true",
        "set lock_configuration = false",
        "set memory_limit = '100GB'",
        "set global temp_directory = '{outside}'",
        "set variable x = 1",
        "reset lock_configuration",
        "pragma enable_profiling",
        "pragma database_list",
    ],
    "ddl and dml": [
        "create table t as select 1",
        "create view v as select * from documents",
        "create macro twice(x) as x * 2",
        "create secret (type s3, key_id 'a', secret 'b')",
        "create table t as pivot documents on corpus using count(*)",
        "drop view documents",
        "insert into documents (id) values ('9')",
        "update documents set text = 'x'",
        "delete from documents",
        "alter view documents rename to d",
        "checkpoint",
        "vacuum",
        "begin transaction",
        "prepare p as select 1",
        "explain select 1",
    ],
    "stacked": [
        "select 1; select 2",
        "select 1; copy (select 1) to '{outside}/x.csv'",
        "select 1; drop view documents",
    ],
    "settings and secrets functions": [
        "select * from duckdb_settings()",
        "select current_setting('temp_directory')",
        "select \"Current_Setting\"('home_directory')",
        "select 'temp_directory'.current_setting()",
        'select * from main."DUCKDB_SETTINGS"()',
        "select * from duckdb_secrets()",
        "select * from which_secret('s3://bucket/x', 's3')",
        "select * from duckdb_databases()",
        "select * from duckdb_databases",
        "select * from duckdb_extensions()",
        "select * from duckdb_temporary_files()",
        "select * from duckdb_memory()",
        "select * from duckdb_logs",
        "select * from pragma_platform()",
        "select * from pragma_user_agent()",
        "select * from pg_settings",
        'select * from pg_catalog."PG_SETTINGS"',
        "show memory_limit",
        "show databases",
        "select * from query('select * from duckdb_' || 'settings()')",
        "select * from query_table('documents')",
        "select * from enable_logging()",
        "select write_log('x')",
    ],
    "call": [
        "call duckdb_settings()",
        "call pragma_version()",
        "call enable_logging()",
    ],
}
CASES = [(category, sql) for category, statements in HOSTILE.items() for sql in statements]


def files_under(path):
    return sorted(os.path.join(folder, name) for folder, _, names in os.walk(path) for name in names)


@pytest.mark.parametrize(("category", "sql"), CASES, ids=[f"{category}: {sql}" for category, sql in CASES])
def test_hostile_sql_is_refused_and_writes_nothing(warehouse_copy, tmp_path, category, sql):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "passwd.csv").write_text("a,b\n1,2\n")
    before = files_under(tmp_path)
    target = tmp_path / "result.csv"

    result = CliRunner().invoke(
        cli, ["-w", str(warehouse_copy.root), "query", sql.format(outside=outside), "--output", str(target)]
    )

    assert result.exit_code == 1, result.output
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert files_under(tmp_path) == before
