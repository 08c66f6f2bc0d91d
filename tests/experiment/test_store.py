"""The results store: bad lines are reported and skipped (never deleted), duplicates count
once, concurrent writers neither interleave nor duplicate rows, non-finite values are
never written."""

import json
import multiprocessing as mp
import os

import pytest

from kdjax.experiment import ResultsWarning, Store


def _rows(n, state="s1"):
    return [{"cell_key": f"k{i}", "seed": i % 3, "code_state": state, "acc": 0.1 * i}
            for i in range(n)]


def test_append_then_read_roundtrip(tmp_path):
    st = Store(str(tmp_path / "r.jsonl"))
    assert st.read() == []
    assert st.append(_rows(4)) == 4
    assert st.read() == _rows(4)
    # appending rows already present writes nothing
    assert st.append(_rows(4)) == 0
    assert len(open(st.path).read().splitlines()) == 4


def test_doubled_lines_count_once_with_a_warning(tmp_path):
    path = tmp_path / "r.jsonl"
    st = Store(str(path))
    st.append(_rows(6))
    text = path.read_text()
    path.write_text(text + text)              # every line twice (12 lines, 6 keys)
    with pytest.warns(ResultsWarning, match="6 duplicated row"):
        rows = st.read()
    assert rows == _rows(6)
    assert len(path.read_text().splitlines()) == 12   # nothing deleted from disk
    # the same key and seed from other code is not a duplicate
    st.append([dict(_rows(1)[0], code_state="s2")])
    with pytest.warns(ResultsWarning):
        assert len(st.read()) == 7


def test_a_cut_last_line_is_reported_skipped_and_kept(tmp_path):
    path = tmp_path / "r.jsonl"
    st = Store(str(path))
    st.append(_rows(2))
    with open(path, "a") as f:
        f.write('{"cell_key": "k9", "seed": 0, "ac')
    with pytest.warns(ResultsWarning, match=r"r\.jsonl, line 3: truncated last line"):
        assert st.read() == _rows(2)
    assert st.problems and "line 3" in st.problems[0]
    # the next append starts on a new line: the new row is intact, the fragment kept
    st.append([{"cell_key": "k5", "seed": 1, "code_state": "s1"}])
    lines = path.read_text().splitlines()
    assert lines[2] == '{"cell_key": "k9", "seed": 0, "ac' and json.loads(lines[3])["cell_key"] == "k5"
    with pytest.warns(ResultsWarning, match="line 3: not JSON"):
        assert [r["cell_key"] for r in st.read()] == ["k0", "k1", "k5"]


def test_a_garbled_middle_line_is_reported_and_kept(tmp_path):
    path = tmp_path / "r.jsonl"
    lines = [json.dumps(r) for r in _rows(3)]
    lines[1] = lines[1][:-1] + "@@@"          # the closing brace garbled
    path.write_text("\n".join(lines) + "\n[1, 2]\n")
    with pytest.warns(ResultsWarning) as rec:
        rows = Store(str(path)).read()
    msgs = [str(w.message) for w in rec]
    assert any("line 2: not JSON" in m for m in msgs)
    assert any("line 4: a JSON list" in m for m in msgs)
    assert [r["cell_key"] for r in rows] == ["k0", "k2"]
    assert path.read_text().count("\n") == 4          # never rewritten


def test_a_non_utf8_byte_names_the_file_and_line(tmp_path):
    path = tmp_path / "r.jsonl"
    Store(str(path)).append(_rows(2))
    with open(path, "ab") as f:
        f.write(b'{"cell_key": "k7", "seed": 0, "name": "caf\xe9"}\n')
    with pytest.warns(ResultsWarning, match=r"r\.jsonl, line 3: not UTF-8 \(byte 0xe9"):
        assert Store(str(path)).read() == _rows(2)


def test_non_finite_values_are_stored_as_null_and_listed(tmp_path):
    st = Store(str(tmp_path / "r.jsonl"))
    with pytest.warns(ResultsWarning, match="non-finite"):
        st.append([{"cell_key": "a", "seed": 0, "acc": float("nan"),
                    "extra": {"kl": float("inf")}}])
    text = open(st.path).read()
    assert "NaN" not in text and "Infinity" not in text
    row = st.read()[0]
    assert row["acc"] is None and row["extra"]["kl"] is None
    assert row["nonfinite"] == ["acc", "extra.kl"]


def _writer(path, start, n):
    st = Store(path)
    for i in range(start, start + n):
        # both processes also write the same shared rows: they must not be duplicated
        st.append([{"cell_key": f"own{i}", "seed": 0, "code_state": "s", "pad": "x" * 5000},
                   {"cell_key": f"shared{i - start}", "seed": 0, "code_state": "s"}])


def test_two_concurrent_writer_processes(tmp_path):
    path = str(tmp_path / "r.jsonl")
    ctx = mp.get_context("spawn")
    ps = [ctx.Process(target=_writer, args=(path, start, 40)) for start in (0, 1000)]
    for p in ps:
        p.start()
    for p in ps:
        p.join(120)
        assert p.exitcode == 0
    lines = open(path).read().splitlines()
    rows = [json.loads(line) for line in lines]             # every line is whole JSON
    keys = [r["cell_key"] for r in rows]
    assert len(keys) == len(set(keys)) == 40 + 40 + 40      # no duplicate, none lost
    assert sum(k.startswith("own") for k in keys) == 80
    assert not os.path.exists(path + ".tmp")
