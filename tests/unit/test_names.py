import pytest

from aisetl.model.errors import InvalidName
from aisetl.model.names import split_bucket_object, validate_bucket, validate_object


@pytest.mark.parametrize("name", ["a", "images", "my-bucket_1", "v1.2", "_x"])
def test_valid_bucket_names(name: str) -> None:
    assert validate_bucket(name) == name


@pytest.mark.parametrize("name", ["", ".", "..", "-x", "a/b", "a b", "x" * 65, "é", "a\x00"])
def test_invalid_bucket_names_name_the_rule(name: str) -> None:
    with pytest.raises(InvalidName) as e:
        validate_bucket(name)
    assert "bucket name" in e.value.message


@pytest.mark.parametrize("name", ["shard.in", "a/b/c.jpg", "dir/.hidden", "x" * 255,
                                  "/".join(["d"] * 100), "sp ace", "ünïcode"])
def test_valid_object_names(name: str) -> None:
    assert validate_object(name) == name


@pytest.mark.parametrize("name,fragment", [
    ("", "empty"),
    ("../etc/passwd", "'..'"),
    ("a/../../b", "'..'"),
    ("a/./b", "'.'"),
    ("/abs", "absolute"),
    ("a//b", "empty"),
    ("a/", "empty"),
    ("nul\x00byte", "NUL"),
    ("x" * 256, "segment longer"),
    ("a/" * 600 + "b", "bytes long"),
])
def test_names_that_escape_the_bucket_are_refused(name: str, fragment: str) -> None:
    with pytest.raises(InvalidName) as e:
        validate_object(name, "b")
    assert fragment in e.value.message
    assert e.value.status == 400


def test_split_accepts_provider_prefix() -> None:
    assert split_bucket_object("ais://imagenet") == ("imagenet", "")
    assert split_bucket_object("transform/shard.in") == ("transform", "shard.in")
    assert split_bucket_object("ais://b/x/y") == ("b", "x/y")
    with pytest.raises(InvalidName, match="only 'ais://'"):
        split_bucket_object("s3://b/x")
