"""Sign-up, log-in and the chat page."""

import uuid

import pytest

from chat.models import Conversation

pytestmark = pytest.mark.django_db


def test_sign_up_creates_the_account_and_opens_a_new_chat(client, django_user_model):
    response = client.post(
        "/accounts/signup/",
        {
            "username": "carol",
            "password1": "a-long-pass-phrase-9",
            "password2": "a-long-pass-phrase-9",
        },
    )
    assert response.status_code == 302
    assert django_user_model.objects.filter(username="carol").exists()
    page = client.get("/", follow=True)
    assert page.status_code == 200
    assert page.redirect_chain[-1][0].startswith("/c/")


def test_sign_up_with_mismatched_passwords_shows_the_form_again(client, django_user_model):
    response = client.post(
        "/accounts/signup/", {"username": "carol", "password1": "x1-long-enough", "password2": "y"}
    )
    assert response.status_code == 200
    assert not django_user_model.objects.filter(username="carol").exists()


def test_chat_page_requires_login(client):
    response = client.get(f"/c/{uuid.uuid4()}/")
    assert response.status_code == 302 and "/accounts/login/" in response["Location"]


def test_chat_page_lists_own_conversations_and_flags_demo_model(client, alice, bob, settings):
    settings.OPENAI_API_KEY = ""
    settings.OPENAI_BASE_URL = ""
    Conversation.objects.create(owner=alice, title="Alice's plans")
    Conversation.objects.create(owner=bob, title="Bob's secrets")
    client.force_login(alice)
    page = client.get(f"/c/{uuid.uuid4()}/")
    assert page.status_code == 200
    html = page.content.decode()
    assert "Alice&#x27;s plans" in html or "Alice\\u0027s plans" in html or "Alice's plans" in html
    assert "Bob" not in html
    assert page.context["config"]["demo_mode"] is True


def test_bob_gets_404_on_alices_conversation_page(client, alice, bob):
    conversation = Conversation.objects.create(owner=alice, title="private")
    client.force_login(bob)
    assert client.get(f"/c/{conversation.id}/").status_code == 404


def test_chat_page_does_not_flag_demo_model_when_a_provider_is_set(client, alice, settings):
    settings.OPENAI_BASE_URL = "http://127.0.0.1:9/v1"
    client.force_login(alice)
    assert client.get(f"/c/{uuid.uuid4()}/").context["config"]["demo_mode"] is False
