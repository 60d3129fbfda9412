"""Settings come from their declarations: each variable parses into its field, a bad value is
one SettingsError line, and README's configuration table says what the declarations say."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from app.settings import Settings, SettingsError, markdown_table

README = Path(__file__).resolve().parents[1] / "README.md"

# The public names: users, tests/scale and bench set these, so a rename must be deliberate.
ENV_NAMES = {
    "database_url": "DATABASE_URL",
    "data_dir": "SWITCHBOARD_DATA_DIR",
    "modules": "SWITCHBOARD_MODULES",
    "admin_token": "SWITCHBOARD_ADMIN_TOKEN",
    "internal_token": "SWITCHBOARD_INTERNAL_TOKEN",
    "base_url": "SWITCHBOARD_BASE_URL",
    "heartbeat_seconds": "SWITCHBOARD_HEARTBEAT",
    "db_pool_size": "SWITCHBOARD_DB_POOL_SIZE",
    "default_timeout": "SWITCHBOARD_TIMEOUT",
    "breaker_fail_max": "SWITCHBOARD_BREAKER_FAIL_MAX",
    "breaker_reset_seconds": "SWITCHBOARD_BREAKER_RESET",
    "bulkhead_limit": "SWITCHBOARD_BULKHEAD",
    "relay_batch_size": "SWITCHBOARD_RELAY_BATCH",
    "relay_poll_seconds": "SWITCHBOARD_RELAY_POLL",
    "relay_lease_seconds": "SWITCHBOARD_RELAY_LEASE",
    "relay_yield_seconds": "SWITCHBOARD_RELAY_YIELD",
    "relay_linger_seconds": "SWITCHBOARD_RELAY_LINGER",
    "outbox_retention_seconds": "SWITCHBOARD_OUTBOX_RETENTION",
    "inbox_retention_seconds": "SWITCHBOARD_INBOX_RETENTION",
    "retry_base_seconds": "SWITCHBOARD_RETRY_BASE",
    "retry_cap_seconds": "SWITCHBOARD_RETRY_CAP",
    "retry_max_attempts": "SWITCHBOARD_RETRY_MAX_ATTEMPTS",
    "reservation_ttl_seconds": "SWITCHBOARD_RESERVATION_TTL",
    "idempotency_retention_seconds": "SWITCHBOARD_IDEMPOTENCY_RETENTION",
    "nats_url": "SWITCHBOARD_NATS_URL",
    "broker_port": "SWITCHBOARD_BROKER_PORT",
    "log_level": "SWITCHBOARD_LOG_LEVEL",
    "log_format": "SWITCHBOARD_LOG_FORMAT",
}


def test_each_setting_reads_its_own_environment_variable():
    declared = {f.name: f.metadata["env"] for f in dataclasses.fields(Settings) if f.metadata["env"]}

    assert declared == ENV_NAMES


def test_an_empty_environment_gives_the_declared_defaults():
    settings = Settings.from_env({})

    assert dataclasses.replace(settings, instance_id="x") == Settings(instance_id="x")
    assert settings.database_url is None and settings.modules is None
    assert (settings.data_dir, settings.default_timeout, settings.db_pool_size) == (Path(".switchboard"), 5.0, 20)
    assert settings.reservation_ttl_seconds == 900.0


def test_numbers_paths_and_strings_are_parsed_from_their_variables():
    settings = Settings.from_env(
        {
            "DATABASE_URL": "postgresql://db/x",
            "SWITCHBOARD_DATA_DIR": "/tmp/sb",
            "SWITCHBOARD_TIMEOUT": "2.5",
            "SWITCHBOARD_DB_POOL_SIZE": "7",
            "SWITCHBOARD_ADMIN_TOKEN": "secret",
        }
    )

    assert settings.database_url == "postgresql://db/x"
    assert settings.data_dir == Path("/tmp/sb")
    assert (settings.default_timeout, settings.db_pool_size) == (2.5, 7)
    assert settings.admin_token == "secret"


def test_an_empty_optional_string_means_unset():
    settings = Settings.from_env({"DATABASE_URL": "", "SWITCHBOARD_ADMIN_TOKEN": "", "SWITCHBOARD_BASE_URL": ""})

    assert (settings.database_url, settings.admin_token, settings.base_url) == (None, None, None)


def test_modules_is_a_comma_separated_list_and_empty_means_all():
    assert Settings.from_env({"SWITCHBOARD_MODULES": " orders, payments ,,"}).modules == ("orders", "payments")
    assert Settings.from_env({"SWITCHBOARD_MODULES": ""}).modules is None


def test_each_process_gets_its_own_instance_id():
    assert Settings.from_env({}).instance_id != Settings.from_env({}).instance_id


def test_a_bad_number_is_one_line_naming_the_variable_the_value_and_the_type():
    with pytest.raises(SettingsError) as error:
        Settings.from_env({"SWITCHBOARD_TIMEOUT": "abc"})

    assert str(error.value) == "SWITCHBOARD_TIMEOUT='abc' is not a number (seconds)"


def test_a_fraction_where_a_count_is_expected_is_a_settings_error():
    with pytest.raises(SettingsError) as error:
        Settings.from_env({"SWITCHBOARD_DB_POOL_SIZE": "2.5"})

    assert str(error.value) == "SWITCHBOARD_DB_POOL_SIZE='2.5' is not a whole number"


def test_readme_configuration_table_matches_the_declarations():
    section = README.read_text().split("## Configuration (environment)", 1)[1]
    table = re.search(r"^\|.*?(?=^[^|])", section, re.MULTILINE | re.DOTALL).group(0).strip()

    assert _rows(table) == _rows(markdown_table())
    assert len(_rows(table)) == len(dataclasses.fields(Settings))


def _rows(table: str) -> list[list[str]]:
    return [[cell.strip() for cell in line.strip().strip("|").split(" | ")] for line in table.splitlines()[2:]]
