"""The admin console in a real browser: sign in, create a tenant and a key,
copy the secret, use it with the official OpenAI SDK, see the request in
usage, revoke the key, set a budget and see it refuse; and the refusals
(wrong token, a change without the CSRF token, no session)."""

import re

import openai
import pytest
from playwright.sync_api import Page, expect


def sign_in(page: Page, token: str) -> None:
    page.goto("/console/")
    page.get_by_label("Admin token").fill(token)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("heading", name="Tenants", exact=True)).to_be_visible()


def shot(page: Page, shots, name: str, full_page: bool = True) -> None:
    if shots is not None:
        page.screenshot(path=str(shots / f"{name}.png"), full_page=full_page)


def chat(base_url: str, key: str) -> str:
    client = openai.OpenAI(base_url=base_url, api_key=key, max_retries=0)
    answer = client.chat.completions.create(model="gpt-4.1-mini", messages=[{"role": "user", "content": "hello"}])
    return answer.choices[0].message.content


def test_a_wrong_token_is_refused(page: Page, shots):
    page.goto("/console/")
    shot(page, shots, "sign-in")
    page.get_by_label("Admin token").fill("not-an-admin-token")
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("alert")).to_have_text("That token is not valid.")
    expect(page.get_by_role("navigation", name="Sections")).to_be_hidden()
    assert "tollgate_console" not in {c["name"] for c in page.context.cookies()}


def test_nothing_is_reachable_without_a_session(page: Page):
    page.goto("/console/#/usage")
    expect(page.get_by_label("Admin token")).to_be_visible()
    for path in ["/admin/v1/tenants", "/admin/v1/usage/summary", "/admin/v1/audit", "/console/api/session"]:
        assert page.request.get(path).status == 401, path


def test_the_whole_console(page: Page, shots, base_url, admin_token):
    sign_in(page, admin_token)
    expect(page.get_by_text("Signed in as bootstrap")).to_be_visible()
    shot(page, shots, "tenants")

    # Create a tenant; its page opens.
    page.get_by_label("Id", exact=True).fill("checkout")
    page.get_by_label("Display name").fill("Checkout service")
    page.get_by_role("button", name="Create tenant").click()
    expect(page.get_by_role("heading", name=re.compile("Checkout service"))).to_be_visible()

    # The API's validation speaks through the console.
    page.goto("/console/#/tenants")
    page.get_by_label("Id", exact=True).fill("Not A Slug")
    page.get_by_label("Display name").fill("x")
    page.get_by_role("button", name="Create tenant").click()
    expect(page.get_by_role("alert")).to_contain_text("(id)")

    # Search finds it.
    page.get_by_label("Search").fill("CHECK")
    page.get_by_role("button", name="Filter").click()
    expect(page.get_by_role("link", name="checkout", exact=True)).to_be_visible()
    expect(page.locator("#tenant-list tbody tr")).to_have_count(1)
    page.get_by_role("link", name="checkout", exact=True).click()

    # A key: the secret is shown once, with a copy button.
    page.get_by_role("button", name="New key").click()
    dialog = page.get_by_role("dialog")
    dialog.get_by_label("Name").fill("checkout-api")
    dialog.get_by_role("button", name="Create key").click()
    expect(page.get_by_text("shown only once")).to_be_visible()
    secret = page.locator("#new-secret").input_value()
    assert re.fullmatch(r"tg-\S+-\S+", secret), secret
    page.get_by_role("button", name="Copy").click()
    expect(page.get_by_role("status").filter(has_text="Copied.")).to_be_visible()
    assert page.evaluate("navigator.clipboard.readText()") == secret
    shot(page, shots, "key-created", full_page=False)  # a modal dialog covers the viewport only
    page.get_by_role("button", name="Done").click()
    expect(page.get_by_role("cell", name=re.compile("checkout-api"))).to_be_visible()

    # The key works with the official SDK, and the request shows in usage.
    assert chat(base_url, secret)

    # The ledger writes in batches: wait (in the browser, with its session)
    # until the record is stored, then the usage page shows it.
    page.wait_for_function(
        """async () => {
            const r = await fetch('/admin/v1/usage/records?tenant_id=checkout');
            return r.ok && (await r.json()).data.length === 1;
        }""",
        timeout=30_000,
    )
    page.goto("/console/#/usage?tenant_id=checkout")
    expect(page.locator(".stat", has_text="Requests").locator("strong")).to_have_text("1")
    expect(page.get_by_role("cell", name="gpt-4.1-mini")).to_be_visible()
    # The CSV download carries the record.
    with page.expect_download() as download:
        page.get_by_role("link", name="Download records (CSV)").click()
    csv = open(download.value.path(), encoding="utf-8").read()
    assert "checkout" in csv and "gpt-4.1-mini" in csv, csv

    # The whole history, by tenant and by day (seeded by the Rust driver).
    page.goto("/console/#/usage")
    expect(page.get_by_role("img", name="Cost per day by tenant")).to_be_visible()
    expect(page.get_by_role("img", name="Requests per day by tenant")).to_be_visible()
    expect(page.get_by_role("link", name="search", exact=True)).to_be_visible()
    shot(page, shots, "usage")
    page.get_by_label("By", exact=True).select_option("model")
    page.get_by_label("Per", exact=True).select_option("hour")
    page.get_by_role("button", name="Show").click()
    expect(page.get_by_role("img", name="Cost per hour by model")).to_be_visible()
    # The month asked for is more than hourly figures cover: the last week shows.
    expect(page.get_by_text("Hourly figures cover at most 7 days")).to_be_visible()

    # Revoke the key: the SDK gets 401.
    page.goto("/console/#/tenants/checkout")
    page.get_by_role("button", name="Revoke").click()
    page.get_by_role("button", name="Revoke key").click()
    expect(page.get_by_text("Key checkout-api revoked.")).to_be_visible()
    expect(page.locator("td .badge", has_text="revoked")).to_be_visible()
    with pytest.raises(openai.AuthenticationError):
        chat(base_url, secret)

    # A budget refuses once spent: a second key, a hard budget of a micro-dollar.
    page.get_by_role("button", name="New key").click()
    page.get_by_role("dialog").get_by_label("Name").fill("checkout-batch")
    page.get_by_role("dialog").get_by_role("button", name="Create key").click()
    second = page.locator("#new-secret").input_value()
    page.get_by_role("button", name="Done").click()
    page.get_by_text("Add a budget").click()
    page.get_by_label("Amount (USD)").fill("0.000001")
    page.get_by_role("button", name="Add budget").click()
    expect(page.get_by_text("Budget added.")).to_be_visible()
    expect(page.get_by_role("meter", name="Spend against amount")).to_be_visible()
    with pytest.raises(openai.RateLimitError) as refused:
        chat(base_url, second)
    assert "budget" in str(refused.value).lower()
    shot(page, shots, "tenant")

    # A change without the CSRF token is refused, even with the session cookie.
    status = page.evaluate(
        """() => fetch('/admin/v1/tenants', {method: 'POST', headers: {'content-type': 'application/json'},
             body: JSON.stringify({id: 'forged', display_name: 'forged'})}).then(r => r.status)"""
    )
    assert status == 403
    assert page.request.get("/admin/v1/tenants/forged").status == 404

    # Suspend and resume through the page.
    page.get_by_role("button", name="Suspend").click()
    expect(page.get_by_text("suspended: its keys are refused")).to_be_visible()
    page.get_by_role("button", name="Resume").click()
    expect(page.get_by_text("Tenant checkout resumed.")).to_be_visible()

    # The audit log shows what was done here, and by whom.
    page.get_by_role("link", name="Audit log").click()
    expect(page.get_by_role("cell", name="key.revoke")).to_be_visible()
    expect(page.get_by_role("cell", name="console.sign_in").first).to_be_visible()
    shot(page, shots, "audit")
    page.get_by_role("link", name="Alerts").click()
    expect(page.get_by_role("heading", name="Budget alerts")).to_be_visible()
    shot(page, shots, "alerts")
    page.get_by_role("link", name="Upstreams").click()
    expect(page.get_by_role("cell", name="default", exact=True)).to_be_visible()
    shot(page, shots, "upstreams")

    # Delete the tenant, confirming by its id.
    page.goto("/console/#/tenants/checkout")
    page.get_by_role("button", name="Delete…").click()
    page.get_by_label("Type checkout to confirm").fill("checkout")
    page.get_by_role("button", name="Delete tenant").click()
    expect(page.get_by_text("Tenant checkout deleted.")).to_be_visible()
    assert page.request.get("/admin/v1/tenants/checkout").status == 404

    # Sign out: the cookie opens nothing any more.
    page.get_by_role("button", name="Sign out").click()
    expect(page.get_by_label("Admin token")).to_be_visible()
    assert page.request.get("/admin/v1/tenants").status == 401


def test_keyboard_only_sign_in_and_navigation(page: Page, admin_token):
    page.goto("/console/")
    expect(page.get_by_label("Admin token")).to_be_focused()
    page.keyboard.type(admin_token)
    page.keyboard.press("Enter")
    expect(page.get_by_role("heading", name="Tenants", exact=True)).to_be_visible()
    page.locator("nav a", has_text="Usage").focus()
    page.keyboard.press("Enter")
    expect(page.get_by_role("heading", name="Usage")).to_be_visible()


def test_a_laptop_width_page_does_not_scroll_sideways(page: Page, admin_token):
    page.set_viewport_size({"width": 1024, "height": 768})
    sign_in(page, admin_token)
    for hash_ in ["#/tenants", "#/usage", "#/audit", "#/upstreams"]:
        page.goto(f"/console/{hash_}")
        expect(page.locator("main h1")).to_be_visible()
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1"), hash_


def test_admin_tokens_are_issued_and_revoking_one_ends_its_sessions(page: Page, browser, console_url, admin_token, shots):
    sign_in(page, admin_token)
    page.get_by_role("link", name="Admin tokens").click()
    expect(page.get_by_role("heading", name="Admin tokens")).to_be_visible()
    page.get_by_label("Name").fill("colleague laptop")
    page.get_by_role("button", name="Create admin token").click()
    expect(page.get_by_text("shown only once")).to_be_visible()
    token = page.locator("#new-secret").input_value()
    assert token.startswith("tga-"), token
    page.get_by_role("button", name="Done").click()
    expect(page.get_by_role("cell", name="colleague laptop")).to_be_visible()
    shot(page, shots, "admin-tokens")

    # A colleague signs in with it, in a browser of their own.
    other = browser.new_context(base_url=console_url)
    colleague = other.new_page()
    try:
        sign_in(colleague, token)
        expect(colleague.get_by_text(re.compile(r"Signed in as admin_token:"))).to_be_visible()

        # Revoked here, their session ends there at the next call.
        page.get_by_role("button", name="Revoke").click()
        page.get_by_role("button", name="Revoke admin token").click()
        expect(page.get_by_text("Admin token colleague laptop revoked.")).to_be_visible()
        colleague.get_by_role("link", name="Usage").click()
        expect(colleague.get_by_role("alert")).to_contain_text("revoked")
        expect(colleague.get_by_label("Admin token")).to_be_visible()
    finally:
        other.close()
