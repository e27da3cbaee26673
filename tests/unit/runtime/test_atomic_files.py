"""runtime/files.py: a file or folder is there whole or not at all, and a failed write leaves nothing."""

import pytest

from higgs_ddp.runtime.files import atomic_file, atomic_folder, write_json_atomic


@pytest.mark.parametrize("durable", [False, True])
def test_a_file_is_replaced_whole_and_a_failed_write_leaves_the_old_one_and_no_temporary(tmp_path, durable):
    path = tmp_path / "report.json"
    write_json_atomic(path, {"a": 1}, durable=durable)
    assert path.read_text() == '{"a": 1}'
    with pytest.raises(RuntimeError), atomic_file(path, durable) as tmp:
        tmp.write_text("half")
        raise RuntimeError("the writer fails")
    assert path.read_text() == '{"a": 1}' and [p.name for p in tmp_path.iterdir()] == ["report.json"]


@pytest.mark.parametrize("durable", [False, True])
def test_a_folder_is_replaced_whole_and_a_failed_build_leaves_the_old_one(tmp_path, durable):
    out = tmp_path / "final"
    with atomic_folder(out, durable) as tmp:
        (tmp / "weights").write_text("one")
    with atomic_folder(out, durable) as tmp:
        (tmp / "weights").write_text("two")
    assert (out / "weights").read_text() == "two" and [p.name for p in tmp_path.iterdir()] == ["final"]
    with pytest.raises(RuntimeError), atomic_folder(out, durable) as tmp:
        (tmp / "weights").write_text("three")
        raise RuntimeError("the build fails")
    assert (out / "weights").read_text() == "two" and [p.name for p in tmp_path.iterdir()] == ["final"]
