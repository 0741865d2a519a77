"""Production settings an operator should not have to edit: HTTPS from one switch
(``HTTPS=1``, ``BEHIND_PROXY=1``) with ``manage.py check --deploy`` clean, the chat.W001
warning for plain-HTTP cookies, a Content-Security-Policy header on every page (and no
violation on the chat page, the admin and the API docs in a real browser), and
``Cache-Control: no-store`` wherever a new API token's key is shown.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from chat.models import ApiToken
from tests.conftest import session_cookie

# The browser tests' fixtures (browser, allow_orm_beside_playwright) are used here too.
from tests.test_browser import (  # noqa: F401
    CHROMIUM,
    allow_orm_beside_playwright,
    browser,
    expect_online,
    new_context,
)

ROOT = Path(__file__).resolve().parent.parent
LONG_SECRET = "k3y-" + "x7Qp9zR2mN4vB8cL1aS5dF6gH0jK" * 3

# Prints the ids of the messages `check --deploy` reports, as JSON, for the settings the
# environment gives (settings are read once per process, so each environment needs its
# own process).
CHECK_SCRIPT = """
import json, django
django.setup()
from django.core import checks
messages = checks.run_checks(include_deployment_checks=True)
print(json.dumps(sorted(m.id for m in messages)))
"""


def deploy_check_ids(**env) -> list[str]:
    """The message ids of ``check --deploy`` under the settings read from ``env`` (on top
    of a production environment: DEBUG off, PostgreSQL, Redis, a long key)."""
    base = {
        k: v for k, v in os.environ.items()
        if k not in {"HTTPS", "BEHIND_PROXY", "SECURE_HSTS_SECONDS", "DEBUG", "SECRET_KEY"}
    }
    base.update({
        "DJANGO_SETTINGS_MODULE": "chatproject.settings",
        "DEBUG": "0",
        "SECRET_KEY": LONG_SECRET,
        "DATABASE_URL": "postgres://chat@127.0.0.1:5432/chat",
        "REDIS_URL": "redis://127.0.0.1:6379/0",
        "ALLOWED_HOSTS": "chat.example.com",
        **env,
    })
    done = subprocess.run([sys.executable, "-c", CHECK_SCRIPT], env=base, cwd=ROOT,
                          capture_output=True, text=True, timeout=60, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- HTTPS settings and checks --------------------------------------------------------------
def test_https_switch_makes_check_deploy_report_nothing():
    assert deploy_check_ids(HTTPS="1") == []


def test_plain_http_cookies_with_debug_off_are_warned_about():
    ids = deploy_check_ids()
    assert "chat.W001" in ids
    # ... and Django's own deployment warnings for the same settings.
    assert {"security.W004", "security.W008", "security.W012", "security.W016"} <= set(ids)


def test_the_https_warning_fires_outside_check_deploy_too():
    """A worker started with DEBUG=0 over plain HTTP logs the warning at start-up (every
    command runs the non-deploy checks)."""
    script = CHECK_SCRIPT.replace("include_deployment_checks=True", "")
    env = {k: v for k, v in os.environ.items() if k not in {"HTTPS", "DEBUG"}}
    env.update(DJANGO_SETTINGS_MODULE="chatproject.settings", DEBUG="0",
               SECRET_KEY=LONG_SECRET)
    done = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=60, check=True)
    assert "chat.W001" in json.loads(done.stdout.strip().splitlines()[-1])


def test_https_redirects_plain_http_and_marks_cookies_secure(client, alice, settings):
    settings.SECURE_SSL_REDIRECT = True
    settings.SESSION_COOKIE_SECURE = True
    settings.CSRF_COOKIE_SECURE = True
    settings.SECURE_HSTS_SECONDS = 31536000
    redirected = client.get("/accounts/login/")
    assert redirected.status_code == 301
    assert redirected["Location"] == "https://testserver/accounts/login/"
    page = client.get("/accounts/login/", secure=True)
    assert page.status_code == 200
    assert page.cookies["csrftoken"]["secure"]
    assert page["Strict-Transport-Security"].startswith("max-age=31536000")


def test_behind_a_proxy_the_forwarded_https_is_trusted_and_nothing_is_redirected():
    """BEHIND_PROXY=1 with HTTPS=1: a request the proxy marks X-Forwarded-Proto: https is
    served (no redirect loop), a plain one is redirected."""
    script = """
import django
django.setup()
from django.test import Client
c = Client()
print(c.get("/accounts/login/", HTTP_HOST="chat.example.com").status_code,
      c.get("/accounts/login/", HTTP_HOST="chat.example.com",
            HTTP_X_FORWARDED_PROTO="https").status_code)
"""
    env = {k: v for k, v in os.environ.items() if k not in {"HTTPS", "BEHIND_PROXY"}}
    env.update(DJANGO_SETTINGS_MODULE="chatproject.settings", HTTPS="1", BEHIND_PROXY="1",
               ALLOWED_HOSTS="chat.example.com")
    done = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.split() == ["301", "200"]


# --- Content-Security-Policy ----------------------------------------------------------------
EXPECTED_CSP = {
    "default-src": "'self'", "script-src": "'self'", "style-src": "'self'",
    "img-src": "'self' data:", "connect-src": "'self'", "object-src": "'none'",
    "base-uri": "'none'", "form-action": "'self'", "frame-ancestors": "'none'",
}


def directives(header: str) -> dict[str, str]:
    parts = (part.strip().split(None, 1) for part in header.split(";") if part.strip())
    return {part[0]: part[1] if len(part) > 1 else "" for part in parts}


@pytest.mark.parametrize("path", ["/", "/accounts/login/", "/settings/tokens/", "/admin/",
                                  "/api/usage/"])
def test_every_page_sends_the_content_security_policy_header(client, alice, path):
    client.force_login(alice)
    response = client.get(path, HTTP_ACCEPT="text/html", follow=True)
    assert response.status_code == 200
    policy = directives(response["Content-Security-Policy"])
    for name, value in EXPECTED_CSP.items():
        if name == "style-src" and path.startswith("/api/"):
            continue
        assert policy[name] == value, (path, name)


def test_the_chat_page_has_no_csp_meta_of_its_own(client, alice):
    client.force_login(alice)
    page = client.get("/", follow=True)
    assert b"http-equiv=\"Content-Security-Policy\"" not in page.content


# --- Cache-Control: no-store where a new key is shown -----------------------------------------
def test_the_token_page_showing_a_new_key_is_not_stored(client, alice):
    client.force_login(alice)
    created = client.post("/settings/tokens/", {"action": "create", "name": "cron"})
    assert created.status_code == 200
    assert ApiToken.KEY_PREFIX.encode() in created.content
    assert "no-store" in created["Cache-Control"]
    listed = client.get("/settings/tokens/")
    assert "no-store" in listed["Cache-Control"]


def test_the_api_answer_with_a_new_key_is_not_stored(client, alice):
    client.force_login(alice)
    created = client.post("/api/tokens/", {"name": "cron"}, content_type="application/json")
    assert created.status_code == 201
    assert created.json()["key"].startswith(ApiToken.KEY_PREFIX)
    assert "no-store" in created["Cache-Control"]


# --- in a real browser: no page of the site breaks its own policy -----------------------------
BROWSER_PAGES = ["/", "/settings/tokens/", "/admin/", "/admin/chat/conversation/",
                 "/admin/auth/user/{root}/change/", "/api/docs/", "/api/redoc/",
                 "/api/conversations/"]
REDOC_FOREIGN = {"https://cdn.redoc.ly/redoc/logo-mini.svg"}
RECORD_VIOLATIONS = """
window.__cspViolations = [];
document.addEventListener("securitypolicyviolation", e => window.__cspViolations.push(
    `${e.violatedDirective} ${e.blockedURI} ${e.sourceFile}:${e.lineNumber}`));
"""


@pytest.mark.browser
@pytest.mark.django_db(transaction=True)
@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian chromium is not installed")
def test_chat_admin_and_api_docs_pages_run_under_the_policy_without_violations(
    request, asgi_servers, django_user_model, upstream
):
    chromium = request.getfixturevalue("browser")
    server = asgi_servers(DJANGO_ALLOW_ASYNC_UNSAFE="")
    root = django_user_model.objects.create_superuser("root", password="Root-pass-1234")
    context = new_context(chromium, server, test_hooks=False)
    name, value = session_cookie(root).split("=", 1)
    context.add_cookies([{"name": name, "value": value, "url": server.url}])
    context.add_init_script(RECORD_VIOLATIONS)
    console = []
    try:
        for path in (p.format(root=root.pk) for p in BROWSER_PAGES):
            page = context.new_page()
            page.on("console", lambda msg, path=path: console.append(f"{path}: {msg.text}"))
            response = page.goto(path)
            assert response.status == 200, path
            assert response.headers["content-security-policy"], path
            if path == "/":
                expect_online(page)
            elif path == "/api/docs/":
                page.locator(".swagger-ui .opblock").first.wait_for()
            elif path == "/api/redoc/":
                page.locator(".redoc-wrap, [class*=redoc]").first.wait_for()
            page.wait_for_load_state("networkidle")
            violations = page.evaluate("window.__cspViolations")
            if path == "/api/redoc/":
                # Redoc's script asks for Redocly's logo: other hosts stay refused
                # (the docs need no third party), nothing else.
                violations = [v for v in violations if v.split()[1] not in REDOC_FOREIGN]
            assert violations == [], (path, violations)
            page.close()
    finally:
        context.close()
    assert [line for line in console if "Content Security Policy" in line
            and not any(url in line for url in REDOC_FOREIGN)] == []
    assert context.page_errors == []
