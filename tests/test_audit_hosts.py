"""`fidelity-mw audit` names the host an outbound finding guards: the `[[upstream]]` table
its values go in, read from the URLs written in its code, or the module's one host."""

from __future__ import annotations

import textwrap

from fidelity_mw.tools.audit import audit_source


def hosts(source: str) -> dict[int, str | None]:
    return {f.line: f.host for f in audit_source(textwrap.dedent(source), "svc.py")}


def test_the_url_in_the_decorated_function_names_the_host() -> None:
    found = hosts(
        """
        import httpx
        from tenacity import retry

        @retry
        async def get_invoice(invoice_id: str) -> dict:
            url = f"https://payments.internal/invoices/{invoice_id}"
            return (await httpx.AsyncClient().get(url)).json()

        @retry
        async def get_stock() -> dict:
            return (await httpx.AsyncClient().get("http://inventory.internal:8080/s")).json()
        """
    )
    assert found == {5: "payments.internal", 10: "inventory.internal"}


def test_a_client_base_url_is_the_module_host_when_the_code_has_no_url() -> None:
    found = hosts(
        """
        import httpx
        import stamina

        client = httpx.AsyncClient(base_url="https://payments.internal")

        @stamina.retry(on=httpx.HTTPError, attempts=3)
        async def get_invoice(invoice_id: str) -> dict:
            return (await client.get(f"/invoices/{invoice_id}")).json()
        """
    )
    assert found == {7: "payments.internal"}
    one = audit_source(
        textwrap.dedent(
            """
            import httpx, stamina
            c = httpx.Client(base_url="https://payments.internal")

            @stamina.retry(on=httpx.HTTPError)
            def f():
                return c.get("/x")
            """
        ),
        "svc.py",
    )
    assert str(one[0]).endswith('; in [[upstream]] host = "payments.internal"')


def test_no_host_when_the_urls_name_several_or_are_built_at_run_time() -> None:
    found = hosts(
        """
        import httpx
        from tenacity import retry

        client = httpx.Client()

        @retry
        def both() -> None:
            client.get("https://a.internal/x")
            client.get("https://b.internal/y")

        @retry
        def built(region: str) -> None:
            client.get(f"https://api.{region}.example.com/x")
        """
    )
    assert found == {7: None, 12: None}


def test_no_host_for_what_has_no_upstream_table() -> None:
    # an inbound limit, a deadline ([deadline]) and an SDK's own retries (its own host)
    found = hosts(
        """
        import httpx
        import openai
        from nopanic import compose, deadline
        from slowapi import Limiter
        from slowapi.util import get_remote_address

        limiter = Limiter(key_func=get_remote_address)
        llm = openai.OpenAI(max_retries=5)

        @compose(deadline(30.0))
        async def get_invoice() -> None:
            await httpx.AsyncClient().get("https://payments.internal/x")
        """
    )
    assert set(found.values()) == {None}
    assert len(found) == 3
