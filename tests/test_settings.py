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
            "UPSTREAM_TIMEOUT_S": "2.5",
            "WS_PING_INTERVAL_S": "10",
            "SESSION_TTL_S": "60",
            "GENERATION_LEASE_S": "5",
        }
    )
    assert settings.port == 5001
    assert not settings.demo
    assert settings.allowed_origins == ("https://a.example", "https://b.example")
    assert (settings.max_message_chars, settings.history_turns) == (100, 3)
    assert settings.upstream_timeout_s == 2.5
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
        ("UPSTREAM_TIMEOUT_S", "soon"),
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
