"""Schemathesis hooks (SCHEMATHESIS_HOOKS=tests.gateway.fuzz_hooks): put deep nesting and numbers past
64 bits and past a double's range into the generated bodies, and a NUL, deep nesting or a huge number into
any query or path parameter, where schema-driven generation rarely goes."""

from __future__ import annotations

from typing import Any

import schemathesis
from hypothesis import strategies as st

LARGE = [2**63, 2**64, -(2**63) - 1, 10**30, -(10**40), 10**400, 1.7976931348623157e308, 5e-324]


def _nested(depth: int, leaf: Any) -> Any:
    value = leaf
    for level in range(depth):
        value = [value] if level % 2 else {"n": value}
    return value


_odd_values = st.one_of(
    st.sampled_from(LARGE),
    st.builds(_nested, st.integers(1, 250), st.sampled_from([0, "x", None, *LARGE])),
)


def _spoil(item: Any, where: str, value: Any) -> Any:
    return {**item, where: value} if isinstance(item, dict) else item


def _spoil_body(body: Any, where: str, value: Any) -> Any:
    return [_spoil(item, where, value) for item in body] if isinstance(body, list) else _spoil(body, where, value)


@schemathesis.hook
def flatmap_body(_context: Any, body: Any) -> st.SearchStrategy:
    """The body as generated, or with one field (most often `data`) set to a deep or large value.
    Up to 250 deep: the fuzzer's own JSON copy stops at 255 levels; the deeper cases are raw bodies in
    test_gateway_lifecycle."""
    keys = sorted(body) if isinstance(body, dict) else []
    where = st.one_of(st.just("data"), st.sampled_from(keys)) if keys else st.just("data")
    return st.one_of(st.just(body), st.builds(_spoil_body, st.just(body), where, _odd_values))


_odd_strings = st.sampled_from(["\x00", "a\x00b", "[" * 300 + "]" * 300, '{"n":' * 100 + "0" + "}" * 100, "9" * 400,
                                "1e400", "-9223372036854775809", "18446744073709551616", "NaN", "-0"])


def _spoil_one(params: dict[str, Any] | None, where: str, value: str) -> dict[str, Any] | None:
    return {**params, where: value} if params else params


def _parameters(params: dict[str, Any] | None) -> st.SearchStrategy:
    """The parameters as generated, or with one of them a NUL, deep nesting or a number past 64 bits."""
    if not params:
        return st.just(params)
    return st.one_of(st.just(params), st.builds(_spoil_one, st.just(params), st.sampled_from(sorted(params)),
                                                _odd_strings))


@schemathesis.hook
def flatmap_query(_context: Any, query: dict[str, Any] | None) -> st.SearchStrategy:
    return _parameters(query)


@schemathesis.hook
def flatmap_path_parameters(_context: Any, path_parameters: dict[str, Any] | None) -> st.SearchStrategy:
    return _parameters(path_parameters)
