"""Config loading: typed sections, every error named with its file and key."""

from __future__ import annotations

import pytest

from flexemr.config import load_config, parse_config, parse_size
from flexemr.errors import ConfigError


def test_example_configs_in_etc_load(tmp_path):
    from pathlib import Path

    etc = Path(__file__).resolve().parents[2] / "etc"
    ranker = load_config(etc / "ranker.toml")
    assert ranker.daemon.role == "ranker" and ranker.ranker.engines == 2
    assert ranker.ranker.ring_bytes == 128 << 20
    emb = load_config(etc / "embedding.toml")
    assert emb.embedding.listen == "127.0.0.1:7001"  # beyond loopback needs [daemon].secret_file


def test_every_problem_is_reported_with_its_key_and_a_suggestion(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text('[daemon]\nrole = "ranker"\nmodel = "/m"\n[ranker]\nengins = 2\nmax_batch = 0\nmapping = "x"\n'
                 'ring_bytes = "12 parsecs"\n[cahce]\n')
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert "[ranker].engins: unknown key (did you mean 'engines'?)" in msg
    assert "[ranker].max_batch: must be >= 1, got 0" in msg
    assert "[ranker].mapping: must be one of 'owned', 'shared'" in msg
    assert "[ranker].ring_bytes: not a size" in msg
    assert "[cahce]: unknown section (did you mean [cache]?)" in msg
    assert str(p) in msg


def test_wrong_types_and_bad_server_addresses_are_named():
    with pytest.raises(ConfigError) as e:
        parse_config({"daemon": {"role": "ranker", "model": "/m"}, "ranker": {"engines": "two", "servers": ["nohost"]}}, "c.toml")
    assert "[ranker].engines: must be int, got 'two'" in str(e.value)
    assert "[ranker].servers[0]: 'nohost' must be \"host:port\"" in str(e.value)


def test_embedding_index_must_fit_the_server_count():
    with pytest.raises(ConfigError, match=r"\[embedding\].index: 3 must be in 0..2"):
        parse_config({"daemon": {"role": "embedding", "model": "/m"}, "embedding": {"index": 3, "servers": 3}})


def test_missing_file_and_bad_toml(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "nope.toml")
    (tmp_path / "x.toml").write_text("[daemon\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(tmp_path / "x.toml")


@pytest.mark.parametrize("text, n", [("4096", 4096), (4096, 4096), ("64MiB", 64 << 20), ("2GiB", 2 << 30),
                                     ("1.5GB", 1_500_000_000), ("10 kb", 10_000)])
def test_parse_size(text, n):
    assert parse_size(text) == n


@pytest.mark.parametrize("text", ["", "lots", "-5", "5 parsecs", True])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError):
        parse_size(text)


def test_the_reply_region_limit_is_a_ranker_key_with_sizes_and_reaches_the_socket_front():
    """The ranker's refusal names [ranker].max_reply_region_bytes: it must be a key an operator can set."""
    from flexemrd.inference.service import ServiceOptions

    cfg = parse_config({"ranker": {"max_reply_region_bytes": "64MiB"}})
    assert cfg.ranker.max_reply_region_bytes == 64 << 20
    assert ServiceOptions.from_config(cfg.ranker).max_reply_region_bytes == 64 << 20
    assert parse_config({"ranker": {"max_reply_region_bytes": 0}}).ranker.max_reply_region_bytes == 0
