import pytest

from tide.errors import InputError
from tide.units import format_bytes, parse_size


@pytest.mark.parametrize("text,expected", [
    ("24GiB", 24 * 2**30),
    ("24GB", 24 * 10**9),
    ("1536MiB", 1536 * 2**20),
    ("1.5GiB", 3 * 2**29),
    ("4096", 4096),
    (" 8 kib ", 8192),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "GiB", "12 parsecs", "-5GB", "1e9"])
def test_parse_size_rejects(text):
    with pytest.raises(InputError, match="accepted"):
        parse_size(text, field="--gpu-memory")


def test_format_bytes():
    assert format_bytes(3 * 2**29) == "1.50 GiB"
    assert format_bytes(100) == "100 B"
