"""Settings read once from the environment; bad values named; secrets never shown."""

from pathlib import Path

import pytest

from backend.settings import Settings, SettingsError


def test_defaults_and_a_full_environment():
    assert Settings.from_env({}) == Settings()
    env = {
        "LABEL_STUDIO_URL": "http://label-studio:8080/",
        "LABEL_STUDIO_API_KEY": "0123456789abcdef",
        "MODEL_DIR": "/models",
        "DATABASE_URL": "postgresql+psycopg://derm@db/derm",
        "BASIC_AUTH_USER": "ls",
        "BASIC_AUTH_PASS": "hunter2",
        "REDIS_URL": "redis://redis:6379/0",
        "LOG_LEVEL": "debug",
        "WORKERS": "2",
        "THREADS": "4",
        "START_TRAINING_EACH_N_UPDATES": "25",
        "MODEL_SCORE_THRESHOLD": "0.3",
        "ALLOWED_IMAGE_HOSTS": "images.example.org, CDN.example.org",
    }
    s = Settings.from_env(env)
    assert s.label_studio_url == "http://label-studio:8080" and s.model_dir == Path("/models")
    assert (s.workers, s.threads, s.start_training_each_n_updates) == (2, 4, 25)
    assert s.log_level == "DEBUG" and s.model_score_threshold == 0.3
    assert s.allowed_image_hosts == ("images.example.org", "cdn.example.org")
    for shown in (repr(s), str(s.describe())):
        assert "0123456789abcdef" not in shown and "hunter2" not in shown
    assert s.describe()["label_studio_api_key"] == "<set>"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"WORKERS": "many"}, "WORKERS must be an integer, got 'many'"),
        ({"THREADS": "0"}, "THREADS must be at least 1, got 0"),
        ({"MODEL_SCORE_THRESHOLD": "1.5"}, "MODEL_SCORE_THRESHOLD must be between 0.0 and 1.0"),
        ({"LOG_LEVEL": "loud"}, "LOG_LEVEL must be one of"),
        ({"BASIC_AUTH_USER": "ls"}, "set both BASIC_AUTH_USER and BASIC_AUTH_PASS"),
        ({"LABEL_STUDIO_URL": "label-studio:8080"}, "LABEL_STUDIO_URL must start with http"),
        ({"IMAGE_TIMEOUT": "-1"}, "IMAGE_TIMEOUT must be between"),
        ({"SERVING_ENGINE": "tensorrt"}, "SERVING_ENGINE must be one of onnxruntime, torch, got 'tensorrt'"),
        ({"IMAGE_FETCH_CONCURRENCY": "0"}, "IMAGE_FETCH_CONCURRENCY must be at least 1, got 0"),
    ],
)
def test_bad_values_name_the_variable(env, message):
    with pytest.raises(SettingsError, match=message):
        Settings.from_env(env)


def test_a_child_process_reads_back_the_same_settings():
    settings = Settings(
        label_studio_url="http://label-studio:8080",
        label_studio_api_key="k" * 40,
        model_dir=Path("/data/models"),
        basic_auth_user="ls",
        basic_auth_pass="pw",
        redis_url="redis://redis:6379/0",
        model_score_threshold=0.3,
        allowed_image_hosts=("pacs.local", "10.0.0.5:8080"),
        sync_projects=(1, 7),
        sync_interval=60.0,
        train_epochs=3,
        serving_engine="torch",
        image_fetch_concurrency=3,
    )
    assert Settings.from_env(settings.to_env()) == settings


def test_sync_projects_must_be_ids():
    with pytest.raises(SettingsError, match="SYNC_PROJECTS must be comma-separated project ids"):
        Settings.from_env({"SYNC_PROJECTS": "1,two"})
