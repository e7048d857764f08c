"""Reading NeMo Gym JSONL: every bad row is reported with file:line."""

import json

import pytest

from gymtrl.config.schema import DataSource
from gymtrl.data.read import read_jsonl, read_split
from gymtrl.errors import DataError
from gymtrl.metrics import read_metrics

ROW = {"responses_create_params": {"input": "hi"}}


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_reads_rows_with_their_place(tmp_path):
    p = write_lines(tmp_path / "d.jsonl", [json.dumps(ROW), "", json.dumps(ROW)])
    rows = read_jsonl(p)
    assert [r.where for r in rows] == [f"{p}:1", f"{p}:3"]


@pytest.mark.parametrize("line, message", [
    ('{"responses_create_params": {"input": "x"}', "malformed JSON"),
    ("[1, 2]", "a row must be a JSON object, got list"),
    ('{"input": "x"}', "row has no 'responses_create_params' object"),
    ('{"responses_create_params": {"tools": []}}', "responses_create_params has no 'input'"),
])
def test_bad_line_is_named(tmp_path, line, message):
    p = write_lines(tmp_path / "d.jsonl", [json.dumps(ROW), line])
    with pytest.raises(DataError) as e:
        read_jsonl(p)
    assert f"{p}:2: {message}" in str(e.value)


def test_source_agent_routes_unrouted_rows_and_rejects_conflicts(tmp_path):
    p = write_lines(tmp_path / "d.jsonl", [json.dumps(ROW), json.dumps({**ROW, "task_source": "x"})])
    rows = read_split([DataSource(path=str(p), agent="agent_a")])
    assert rows[0].data["agent_ref"] == {"type": "responses_api_agents", "name": "agent_a"}
    assert "agent_ref" not in rows[1].data  # task_source rows keep NeMo Gym's rule
    q = write_lines(tmp_path / "e.jsonl", [json.dumps({**ROW, "agent_ref": {"name": "agent_b"}})])
    with pytest.raises(DataError, match="conflicts with the source's agent 'agent_a'"):
        read_split([DataSource(path=str(q), agent="agent_a")])


def test_unicode_line_separators_inside_strings_stay_in_their_row(tmp_path):
    # prepare-data writes ensure_ascii=False, so U+2028/U+2029/U+0085 in a prompt reach the file raw;
    # JSON allows them inside strings, and str.splitlines() would cut the row there.
    text = "one\u2028two\u2029three\u0085four"
    p = write_lines(tmp_path / "d.jsonl", [json.dumps({"responses_create_params": {"input": text}}, ensure_ascii=False),
                                          json.dumps(ROW)])
    rows = read_jsonl(p)
    assert [r.where for r in rows] == [f"{p}:1", f"{p}:2"]
    assert rows[0].data["responses_create_params"]["input"] == text
    m = write_lines(tmp_path / "metrics.jsonl", [json.dumps({"step": 1, "note": text}, ensure_ascii=False),
                                                json.dumps({"step": 2})])
    assert read_metrics(m) == [{"step": 1, "note": text}, {"step": 2}]


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(DataError, match="dataset file not found"):
        read_jsonl(tmp_path / "none.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="no rows"):
        read_jsonl(tmp_path / "empty.jsonl")
