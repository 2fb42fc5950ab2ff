"""API key format, hashing and how keys are read from request headers."""

from __future__ import annotations

import hashlib

from starlette.datastructures import Headers

from worker.billing.keys import (
    KEY_PREFIX,
    display_prefix,
    generate_api_key,
    hash_api_key,
    hashes_match,
    looks_like_api_key,
    presented_api_key,
)


def test_generated_keys_have_the_prefix_and_256_random_bits() -> None:
    keys = {generate_api_key() for _ in range(200)}
    assert len(keys) == 200
    for key in keys:
        assert key.startswith(KEY_PREFIX)
        assert len(key) == len(KEY_PREFIX) + 43
        assert looks_like_api_key(key)


def test_malformed_keys_are_recognised_without_a_lookup() -> None:
    key = generate_api_key()
    assert not looks_like_api_key(key[:-1])
    assert not looks_like_api_key(key + "x")
    assert not looks_like_api_key("sk-" + key[len(KEY_PREFIX) :])
    assert not looks_like_api_key(key[:-1] + "!")


def test_hash_is_sha256_hex_and_never_the_key() -> None:
    key = generate_api_key()
    digest = hash_api_key(key)
    assert digest == hashlib.sha256(key.encode()).hexdigest()
    assert key not in digest
    assert hashes_match(digest, hash_api_key(key))
    assert not hashes_match(digest, hash_api_key(generate_api_key()))


def test_display_prefix_reveals_only_a_few_characters() -> None:
    key = generate_api_key()
    prefix = display_prefix(key)
    assert key.startswith(prefix)
    assert len(prefix) <= len(KEY_PREFIX) + 8


def test_key_is_read_from_bearer_or_x_api_key() -> None:
    key = generate_api_key()
    assert presented_api_key(Headers({"Authorization": f"Bearer {key}"})) == key
    assert presented_api_key(Headers({"authorization": f"bearer  {key} "})) == key
    assert presented_api_key(Headers({"X-API-Key": key})) == key
    assert presented_api_key(Headers({"authorization": f"Basic {key}", "x-api-key": key})) == key
    assert presented_api_key(Headers({"authorization": "Bearer "})) is None
    assert presented_api_key(Headers({})) is None
