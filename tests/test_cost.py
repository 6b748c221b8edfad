from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from balancer import cost
from balancer.operations import OPERATIONS

CHAT, EMBEDDINGS = OPERATIONS["chat/completions"], OPERATIONS["embeddings"]


def test_chat_estimate_counts_messages_and_budget() -> None:
    body = {"messages": [{"role": "system", "content": "x" * 40},
                         {"role": "user", "content": "y" * 8}], "max_tokens": 100}
    est = CHAT.estimate(body, default_max_tokens=1024)
    assert est.prompt == 3 + (4 + 10) + (4 + 2)
    assert est.completion == 100
    assert est.total == est.prompt + 100


def test_budget_precedence_and_default() -> None:
    body = {"messages": [{"role": "user", "content": "hi"}]}
    assert cost.completion_budget(body, 77) == 77
    assert cost.completion_budget({**body, "max_tokens": 5}, 77) == 5
    both = {**body, "max_tokens": 5, "max_completion_tokens": 9, "n": 2}
    assert cost.completion_budget(both, 77) == 18


def test_embeddings_cost_input_only() -> None:
    est = EMBEDDINGS.estimate({"input": ["abcd", "abcdefgh"], "max_tokens": 50}, 1024)
    assert est == cost.Estimate(3, 0)
    assert EMBEDDINGS.prompt_tokens({"input": [[1, 2, 3], [4]]}) == 4


def test_multipart_content() -> None:
    body = {"messages": [{"role": "user", "content": [{"type": "text", "text": "abcdefgh"},
                                                      {"type": "image_url", "image_url": {}}]}]}
    assert CHAT.prompt_tokens(body) == 3 + 4 + 2 + 85


@given(st.text(max_size=2000))
def test_text_tokens_is_a_ceiling_of_chars_over_four(text: str) -> None:
    n = cost.text_tokens(text)
    assert 4 * n >= len(text) > 4 * (n - 1) or (text == "" and n == 0)
