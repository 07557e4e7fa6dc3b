"""The local control store's records and errors."""

from pathlib import Path

import pytest

from aisetl.control.local import LocalControlStore
from aisetl.model.errors import EtlExists, InvalidRequest
from aisetl.model.etl import parse_build, to_document

CODE = "def transform(b):\n    return b\n"


async def test_an_id_clash_names_the_existing_etl(tmp_path: Path) -> None:
    store = LocalControlStore(tmp_path)
    await store.create_etl(to_document(parse_build({"code": CODE, "runtime": "python3",
                                                    "id": "md5_a"})))
    with pytest.raises(EtlExists) as e:
        await store.create_etl(to_document(parse_build({"code": CODE, "runtime": "python3",
                                                        "id": "MD5-A"})))
    assert "as 'md5_a'" in e.value.message and "ais etl stop md5_a" in e.value.message


async def test_record_names_cannot_leave_their_directory(tmp_path: Path) -> None:
    store = LocalControlStore(tmp_path)
    assert await store.get_xaction("../buckets/x") is None
    with pytest.raises(InvalidRequest):
        await store.put_xaction("../../evil", {"a": 1})
    assert not (tmp_path / "evil.json").exists()
