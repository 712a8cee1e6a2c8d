"""The R lazy-load reader on bytes built here by R's XDR rules, and on the real Austen package."""

import gzip
import struct
import zlib

import pytest

from peft_jax import errors
from peft_jax.data import austen
from peft_jax.data.r_lazyload import decode, read_lazyload


def _i(*xs):
    return struct.pack(f">{len(xs)}i", *xs)


def _header():
    return b"X\n" + _i(3, 0x40201, 0x30500) + _i(5) + b"UTF-8"


def _strings(values):
    out = _i(16, len(values))
    for v in values:
        out += _i(9, -1) if v is None else _i(0x40009, len(v.encode())) + v.encode()
    return out


def _named_list(items):
    """VECSXP with a names attribute (flags: type 19 | has-attributes 0x200)."""
    out = _i(19 | 0x200, len(items))
    for _, (offset, length) in items:
        out += _i(13, 2, offset, length)
    # attributes: one pairlist cell tagged with the symbol 'names' (type 2 | has-tag 0x400)
    out += _i(2 | 0x400) + _i(1) + _i(0x40009, 5) + b"names" + _strings([k for k, _ in items])
    return out + _i(254)


def test_decode_strings_and_missing_values():
    assert decode(_header() + _strings(["Emma", "", None, "café"])) == ["Emma", "", None, "café"]


def test_read_lazyload_round_trip(tmp_path):
    books = {"one": ["A", "b c"], "two": ["ÉMMA", None]}
    rdb, index = b"", []
    for name, lines in books.items():
        body = _header() + _strings(lines)
        blob = struct.pack(">I", len(body)) + zlib.compress(body)
        index.append((name, (len(rdb), len(blob))))
        rdb += blob
    rdx = _header() + _i(19 | 0x200, 1) + _named_list(index) + (
        _i(2 | 0x400) + _i(1) + _i(0x40009, 5) + b"names" + _strings(["variables"]) + _i(254))
    (tmp_path / "Rdata.rdb").write_bytes(rdb)
    (tmp_path / "Rdata.rdx").write_bytes(gzip.compress(rdx))
    assert read_lazyload(tmp_path / "Rdata") == books


def test_not_r_data():
    with pytest.raises(errors.DataError, match="XDR"):
        decode(b"RDX3\n")


def test_missing_files(tmp_path):
    with pytest.raises(errors.DataError, match="cannot read"):
        read_lazyload(tmp_path / "Rdata")


def test_the_real_novels():
    try:
        novels = austen.load_novels()
    except errors.MissingPackageError as e:
        pytest.skip(str(e))
    assert sorted(novels) == ["emma", "mansfieldpark", "northangerabbey", "persuasion",
                              "prideprejudice", "sensesensibility"]
    assert sum(map(len, novels.values())) == 73422  # as ../shared/ASSETS.md counts them
    assert novels["prideprejudice"][0] == "PRIDE AND PREJUDICE"
    assert any("truth universally acknowledged" in line for line in novels["prideprejudice"])


def test_missing_package_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(austen, "_candidates", lambda: [tmp_path / "Rdata"])
    with pytest.raises(errors.MissingPackageError, match="apt-get download r-cran-janeaustenr"):
        austen.load_novels()
