"""PipelineConfig: presets load, overrides apply, bad keys and values fail naming the key."""
import pytest

from tasks.core.config import CONFIG_DIR, ConfigError, PipelineConfig, load_config, redacted_params


@pytest.mark.parametrize("preset", sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
def test_every_preset_validates(preset):
    cfg = load_config(preset)
    assert isinstance(cfg, PipelineConfig)
    assert cfg.model.preset in {"debug", "tiny", "125m", "1.3b", "2.7b"}


def test_overrides_are_typed_and_applied():
    cfg = load_config("debug", ["train.max_steps=7", "corpus.sources=[a, b]", "train.lr=1e-4",
                                "model.overrides.num_layers=4"])
    assert cfg.train.max_steps == 7
    assert cfg.corpus.sources == ["a", "b"]
    assert cfg.train.lr == pytest.approx(1e-4)
    assert cfg.model.overrides == {"num_layers": 4}


@pytest.mark.parametrize("override, key", [
    ("train.max_stepz=3", "train.max_stepz"),
    ("train.max_steps=-1", "train.max_steps"),
    ("train.max_steps=abc", "train.max_steps"),
    ("tokenizer.val_fraction=0.9", "tokenizer.val_fraction"),
    ("bogus.key=1", "bogus"),
    ("model.preset=huge", "model.preset"),
])
def test_bad_override_names_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_config("debug", [override])
    assert key in str(err.value)


def test_cross_section_check_names_both_keys():
    with pytest.raises(ConfigError) as err:
        load_config("debug", ["tokenizer.seq_len=512", "model.overrides.max_position_embeddings=128"])
    assert "tokenizer.seq_len" in str(err.value)
    assert "max_position_embeddings" in str(err.value)


def test_malformed_override_and_unknown_preset():
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config("debug", ["train.max_steps"])
    with pytest.raises(ConfigError, match="known presets"):
        load_config("no-such-preset")


def test_redacted_params_flatten_everything_and_mask_secrets():
    cfg = load_config("debug")
    params = redacted_params(cfg)
    assert params["train.max_steps"] == str(cfg.train.max_steps)
    assert params["registry.model_name"] == "gpt-neo-debug"
    assert params["corpus.sources"] == '["python-stdlib"]'
    from pydantic import BaseModel

    def leaves(obj) -> int:
        return sum(leaves(getattr(obj, f)) if isinstance(getattr(obj, f), BaseModel) else 1
                   for f in type(obj).model_fields)

    assert len(params) == leaves(cfg)

    from pydantic import SecretStr
    from tasks.core.section import Section

    class S3(Section):
        endpoint: str = "http://x"
        aws_secret_access_key: SecretStr = SecretStr("hunter2")

    class WithSecret(PipelineConfig):
        storage: S3 = S3()

    masked = redacted_params(WithSecret())
    assert masked["storage.aws_secret_access_key"] == "***"
    assert masked["storage.endpoint"] == "http://x"
    assert "hunter2" not in str(masked)
