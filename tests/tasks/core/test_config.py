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


def test_query_secrets_never_reach_params_or_flow_run_parameters():
    import json

    from prefect import flow

    from tasks.core.data_config import SourceSpec

    url = "https://store.example.org/corpus/a.jsonl.zst?download=1&token=TOK-SECRET&X-Amz-Signature=SIG-SECRET"
    shown = "https://store.example.org/corpus/a.jsonl.zst?download=1&token=***&X-Amz-Signature=***"
    cfg = load_config("debug", [f'corpus.sources=["{url}", {{url: "{url}&part=2", sha256: null}}]',
                                f"tokenizer.tokenizer_source={url}"])
    assert all(isinstance(s, SourceSpec) for s in cfg.corpus.sources)
    assert cfg.corpus.sources[0].url == shown
    assert cfg.corpus.sources[0].request_url() == url  # what is sent keeps the secrets
    assert cfg.corpus.sources[1].request_url() == url + "&part=2"

    @flow
    def takes_config(config: PipelineConfig):  # what Prefect stores as a flow run's parameters
        return None

    params = redacted_params(cfg)
    assert json.loads(params["corpus.sources"])[0]["url"] == cfg.corpus.sources[0].url
    assert params["tokenizer.tokenizer_source"] == shown  # any URL-holding value, through `redact`
    assert cfg.tokenizer.tokenizer_source == shown
    assert cfg.tokenizer.source_secrets() == ("download=1&token=TOK-SECRET&X-Amz-Signature=SIG-SECRET", None)
    flow_params = takes_config.serialize_parameters({"config": cfg})
    for blob in (json.dumps(params), json.dumps(flow_params), cfg.model_dump_json(), repr(cfg)):
        assert "SECRET" not in blob and "download=1" in blob
    # the config survives a round trip through its own dump (as `resolve_config` does)
    again = PipelineConfig.model_validate(cfg.model_dump())
    assert again.corpus.sources[0].request_url() == url
    assert again.tokenizer.source_secrets() == cfg.tokenizer.source_secrets()


def test_secrets_typed_into_a_runs_overrides_are_masked_in_prefects_database():
    """A deployment run's raw `overrides` (or `config`) parameter holding a signed URL: the flow's
    `resolve_config` (the first call of every flow) stores the run's parameters redacted, and the
    run itself still uses the secret."""
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.context import FlowRunContext

    from tasks.core.config import resolve_config

    url = "https://store.example.org/c/a.jsonl.zst?download=1&X-Amz-Signature=SIG-SECRET"
    user_url = "https://alice:PW-SECRET@store.example.org/c/tokenizer.json"

    @flow
    def like_a_deployment_run(preset: str, overrides: dict):
        cfg = resolve_config(None, preset, overrides)
        return str(FlowRunContext.get().flow_run.id), cfg

    run_id, cfg = like_a_deployment_run("debug", {"corpus.sources": [url],
                                                  "tokenizer.tokenizer_source": user_url})
    assert cfg.corpus.sources[0].request_url() == url  # the run used the secret
    assert cfg.tokenizer.tokenizer_source_auth.get_secret_value() == "alice:PW-SECRET"
    with get_client(sync_client=True) as client:
        stored = client.read_flow_run(run_id).parameters
    assert stored["preset"] == "debug"
    assert stored["overrides"] == {
        "corpus.sources": ["https://store.example.org/c/a.jsonl.zst?download=1&X-Amz-Signature=***"],
        "tokenizer.tokenizer_source": "https://store.example.org/c/tokenizer.json"}


@pytest.mark.parametrize("given,auth", [
    ("https://user:p%40ss@h.org/x.jsonl", "user:p@ss"),       # percent-decoded, as requests sends it
    ("https://user:p@ss@h.org/x.jsonl", "user:p@ss"),         # split at the last `@`
    ("https://us%20er:%E2%9C%93%3A@h.org/x.jsonl", "us er:\u2713:"),
    ("https://token@h.org/x.jsonl", "token"),
])
def test_url_credentials_one_parser(given, auth):
    from tasks.core.data_config import CorpusConfig, SourceSpec
    from tasks.core.urls import redact

    spec = CorpusConfig(sources=[given]).sources[0]
    assert isinstance(spec, SourceSpec) and spec.auth.get_secret_value() == auth
    assert spec.url == redact(given) == "https://h.org/x.jsonl"
    explicit = SourceSpec(url=given, auth="other:pw")  # an explicit `auth` wins, the URL is cleaned
    assert explicit.auth.get_secret_value() == "other:pw" and explicit.url == "https://h.org/x.jsonl"
