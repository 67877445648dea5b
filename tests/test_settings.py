"""Settings precedence (flags > environment > TOML > defaults) and clear errors."""

from pathlib import Path

import pytest

from agent.settings import DEFAULT_DATA_DIR, Settings, SettingsError


def test_defaults_match_the_original_flags():
    s = Settings.load({}, environ={})
    assert s.url == "" and s.token == "" and s.logs_endpoint == ""
    assert s.data_dir == DEFAULT_DATA_DIR == Path("/var/lib/techulus-agent")
    assert s.tick_interval == 10 and s.processing_timeout == 300


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"health_runner": "systemd"}, "health_runner must be auto, podman or agent"),
        ({"fast_poll_interval": 0}, "fast_poll_interval must be positive"),
        ({"drain_timeout": -1}, "drain_timeout must be positive"),
        ({"report_coalesce": -0.1}, "report_coalesce must not be negative"),
    ],
)
def test_rollout_settings_are_checked(values, message):
    with pytest.raises(SettingsError, match=message):
        Settings.from_mapping(values)


def test_rollout_settings_from_the_environment():
    settings = Settings.load(environ={"TECHULUS_AGENT_HEALTH_RUNNER": "agent", "TECHULUS_AGENT_DRAIN_TIMEOUT": "5"})
    assert (settings.health_runner, settings.drain_timeout, settings.fast_follow_timeout) == ("agent", 5.0, 30.0)


def test_precedence(tmp_path):
    config = tmp_path / "agent.toml"
    config.write_text('url = "https://toml.example"\ndata-dir = "/toml"\nlogs_endpoint = "http://toml:9428"\nstop_timeout = 3\n')
    environ = {"TECHULUS_AGENT_DATA_DIR": "/env", "TECHULUS_AGENT_LOGS_ENDPOINT": "http://env:9428"}
    s = Settings.load({"logs_endpoint": "http://flag:9428", "url": None}, environ=environ, config_file=config)
    assert s.url == "https://toml.example"
    assert s.data_dir == Path("/env")
    assert s.logs_endpoint == "http://flag:9428"
    assert s.stop_timeout == 3


def test_agent_table_and_lists(tmp_path):
    config = tmp_path / "agent.toml"
    config.write_text('[agent]\ninsecure_registries = ["registry.internal:5000"]\nmanage_caddy = false\n')
    s = Settings.load({}, environ={}, config_file=config)
    assert s.insecure_registries == ("registry.internal:5000",)
    assert not s.manage_caddy


def test_environment_lists_and_buildkit_host():
    s = Settings.load({}, environ={"TECHULUS_AGENT_INSECURE_REGISTRIES": "a:5000, b:5000", "BUILDKIT_HOST": "unix:///x"})
    assert s.insecure_registries == ("a:5000", "b:5000")
    assert s.buildkit_host == "unix:///x"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("nonsense = 1\n", "unknown setting"),
        ("stop_timeout = 'ten'\n", "stop_timeout"),
        ("manage_dns = 'maybe'\n", "manage_dns"),
        ("url = 'ftp://x'\n", "--url must be an http"),
        ("heartbeat_interval = 40\n", "heartbeat_interval"),
        ("url = [\n", "not valid TOML"),
    ],
)
def test_bad_config_files(tmp_path, content, message):
    config = tmp_path / "agent.toml"
    config.write_text(content)
    with pytest.raises(SettingsError, match=message):
        Settings.load({}, environ={}, config_file=config)


def test_missing_config_file(tmp_path):
    with pytest.raises(SettingsError, match="does not exist"):
        Settings.load({}, environ={}, config_file=tmp_path / "nope.toml")


def test_token_sources(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("  abc123\n")
    assert Settings.load({"token_file": str(token_file)}, environ={}).resolved_token() == "abc123"
    assert Settings.load({}, environ={"TECHULUS_AGENT_TOKEN": "fromenv"}).resolved_token() == "fromenv"
    assert "fromenv" not in repr(Settings.load({}, environ={"TECHULUS_AGENT_TOKEN": "fromenv"}))
    with pytest.raises(SettingsError, match="token_file"):
        Settings.load({"token_file": str(tmp_path / "missing")}, environ={}).resolved_token()


def test_caddy_upstream_networks_from_toml(tmp_path):
    config = tmp_path / "agent.toml"
    config.write_text('caddy_upstream_networks = ["10.200.0.0/16"]\n')
    assert Settings.load({}, environ={}, config_file=config).caddy_upstream_networks == ("10.200.0.0/16",)


def test_registered_and_standalone_agents_get_different_networks(tmp_path):
    assert Settings.load({}, environ={}).container_network == "techulus"
    standalone = Settings.load({"state_file": str(tmp_path / "s.toml")}, environ={})
    assert standalone.container_network == "techulus-standalone"
    named = Settings.load({"state_file": str(tmp_path / "s.toml")}, environ={"TECHULUS_AGENT_NETWORK_NAME": "mine"})
    assert named.container_network == "mine"


@pytest.mark.parametrize("start,stop", [(80, 85), (101, 80), (85, -1)])
def test_image_gc_watermarks_must_be_ordered_percentages(start, stop):
    with pytest.raises(SettingsError, match="watermarks"):
        Settings.load({"image_gc_start_percent": start, "image_gc_stop_percent": stop}, environ={})


def test_drain_grace_defaults_to_the_tick_and_is_bounded_by_the_drain_timeout():
    assert Settings.load({}, environ={}).drain_grace_seconds == 10.0
    assert Settings.load({"tick_interval": 4}, environ={}).drain_grace_seconds == 4.0
    assert Settings.load(environ={"TECHULUS_AGENT_DRAIN_GRACE": "0"}).drain_grace_seconds == 0.0
    assert Settings.load({"drain_grace": 300, "drain_timeout": 45}, environ={}).drain_grace_seconds == 45.0
