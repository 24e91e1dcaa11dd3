"""Settings come from the environment and fail at start-up with the variable's name."""

from __future__ import annotations

import subprocess
import sys

import pytest

from chatbot.errors import SettingsError
from chatbot.settings import DEFAULT_MODEL, Settings


def test_defaults_run_with_no_setup() -> None:
    settings = Settings.from_env({})
    assert settings.port == 8000
    assert settings.openai_model == DEFAULT_MODEL
    assert settings.redis_url is None
    assert settings.demo
    assert settings.ws_ping_interval_s < 55  # under Heroku's idle cut


def test_every_variable_is_read() -> None:
    settings = Settings.from_env(
        {
            "PORT": "5001",
            "OPENAI_API_KEY": "sk-x",
            "OPENAI_BASE_URL": "http://localhost:11434/v1",
            "OPENAI_MODEL": "llama3",
            "SYSTEM_PROMPT": "Be brief.",
            "REDIS_URL": "rediss://:pw@example.com:6380/0?ssl_cert_reqs=none",
            "ALLOWED_ORIGINS": "https://a.example, https://b.example/",
            "MAX_MESSAGE_CHARS": "100",
            "HISTORY_TURNS": "3",
            "UPSTREAM_CONNECT_TIMEOUT_S": "1.5",
            "UPSTREAM_FIRST_TOKEN_TIMEOUT_S": "2.5",
            "UPSTREAM_IDLE_TIMEOUT_S": "3.5",
            "UPSTREAM_MAX_RETRIES": "0",
            "UPSTREAM_BREAKER_FAILURES": "3",
            "UPSTREAM_BREAKER_COOLDOWN_S": "4",
            "WS_PING_INTERVAL_S": "10",
            "SESSION_TTL_S": "60",
            "GENERATION_LEASE_S": "5",
        }
    )
    assert settings.port == 5001
    assert not settings.demo
    assert settings.allowed_origins == ("https://a.example", "https://b.example")
    assert (settings.max_message_chars, settings.history_turns) == (100, 3)
    assert (
        settings.upstream_connect_timeout_s,
        settings.upstream_first_token_timeout_s,
        settings.upstream_idle_timeout_s,
    ) == (1.5, 2.5, 3.5)
    assert settings.upstream_max_retries == 0
    assert (settings.upstream_breaker_failures, settings.upstream_breaker_cooldown_s) == (3, 4.0)
    assert settings.lease_ttl_s == 5.0


def test_secrets_stay_out_of_repr() -> None:
    settings = Settings.from_env({"OPENAI_API_KEY": "sk-secret", "REDIS_URL": "redis://:pw@h/0"})
    assert "sk-secret" not in repr(settings)
    assert "pw@" not in repr(settings)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("PORT", "eighty"),
        ("PORT", "70000"),
        ("MAX_MESSAGE_CHARS", "0"),
        ("HISTORY_TURNS", "-2"),
        ("UPSTREAM_FIRST_TOKEN_TIMEOUT_S", "soon"),
        ("UPSTREAM_IDLE_TIMEOUT_S", "0"),
        ("UPSTREAM_MAX_RETRIES", "-1"),
        ("UPSTREAM_BREAKER_FAILURES", "0"),
        ("REDIS_URL", "localhost:6379"),
        ("OPENAI_BASE_URL", "ftp://x"),
        ("ALLOWED_ORIGINS", "example.com"),
        ("LOG_LEVEL", "LOUD"),
    ],
)
def test_bad_values_name_the_variable(variable: str, value: str) -> None:
    with pytest.raises(SettingsError) as error:
        Settings.from_env({variable: value})
    assert error.value.variable == variable
    assert variable in str(error.value) and value in str(error.value)


def test_the_server_refuses_to_start_with_a_bad_value() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "chatbot", "serve"],
        env={"PORT": "nope", "PATH": ""},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "PORT" in result.stderr


def test_the_removed_upstream_timeout_is_refused_not_ignored() -> None:
    with pytest.raises(SettingsError) as error:
        Settings.from_env({"UPSTREAM_TIMEOUT_S": "60"})
    assert error.value.variable == "UPSTREAM_TIMEOUT_S"
    assert "UPSTREAM_FIRST_TOKEN_TIMEOUT_S" in str(error.value)
