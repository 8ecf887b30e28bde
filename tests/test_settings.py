"""Settings: secrets are checked strictly at start, and errors name the variable."""

from __future__ import annotations

import pytest

from shared.settings import ConfigError, load_settings
from tests.support import OLD_SECRET, SECRET


class TestWebhookKey:
    def test_several_secrets_separated_by_spaces_or_commas_are_all_kept(self) -> None:
        for joined in (f"{SECRET} {OLD_SECRET}", f"{SECRET},{OLD_SECRET}", f" {SECRET} ,\n"):
            kept = load_settings(dodo_payments_webhook_key=joined, _env_file=None)
            assert kept.dodo_payments_webhook_key[0] == SECRET

    @pytest.mark.parametrize(
        ("secret", "problem"),
        [
            ("not-a-secret", "does not start with whsec_"),
            ("whsec_", "shorter than 16 bytes"),
            ("whsec_%%%", "not base64"),
            ("whsec_abc!def", "not base64"),
            ("whsec_c2hvcnQ=", "shorter than 16 bytes"),
        ],
    )
    def test_a_malformed_secret_is_refused_naming_the_variable(
        self, secret: str, problem: str
    ) -> None:
        with pytest.raises(ConfigError) as refused:
            load_settings(dodo_payments_webhook_key=f"{SECRET} {secret}", _env_file=None)
        message = str(refused.value)
        assert message.startswith("DODO_PAYMENTS_WEBHOOK_KEY: secret #2")
        assert problem in message
        assert secret.removeprefix("whsec_") not in message or secret == "whsec_"

    def test_an_out_of_range_number_names_its_variable(self) -> None:
        with pytest.raises(ConfigError, match=r"^MAX_ATTEMPTS: "):
            load_settings(max_attempts=0, _env_file=None)


class TestOutboundSettings:
    def test_urls_split_on_spaces_and_secrets_on_commas(self) -> None:
        settings = load_settings(
            outbound_webhook_url="http://a.test/x  https://b.test:9/y",
            outbound_webhook_secret=f"{SECRET},{OLD_SECRET}",
            _env_file=None,
        )
        assert settings.outbound_webhook_url == ["http://a.test/x", "https://b.test:9/y"]
        assert settings.require_outbound_secret() == SECRET

    def test_a_url_that_is_not_http_is_one_line_naming_the_variable(self) -> None:
        with pytest.raises(ConfigError, match=r"^OUTBOUND_WEBHOOK_URL: URL #2 is not"):
            load_settings(outbound_webhook_url="http://a.test/x ftp://b", _env_file=None)

    def test_urls_without_a_secret_are_refused_when_signing(self) -> None:
        settings = load_settings(outbound_webhook_url="http://a.test/x", _env_file=None)
        with pytest.raises(ConfigError, match=r"^OUTBOUND_WEBHOOK_SECRET is not set"):
            settings.require_outbound_secret()
