"""PrepConfig's validation (every field: the error names it and what is allowed) and loading it from
TOML / JSON with per-stage tables and command-line overrides."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from parallax.data.prep.config import PrepConfig, load_prep_config


def test_defaults_and_normalisation() -> None:
    c = PrepConfig(out="o")
    assert (c.input, c.format, c.tokenizer, c.executor, c.workers, c.on_error, c.samples, c.stages) == (
        None, ("tokens",), None, "local", 1, "skip", 20, {})
    assert PrepConfig(out="o", format="tokens, jsonl").format == ("tokens", "jsonl")
    assert PrepConfig(out="o", format=["jsonl"]).format == ("jsonl",)
    assert PrepConfig(out=Path("o"), input=Path("in")).out == "o"


@pytest.mark.parametrize("kwargs, message", [
    ({"out": ""}, "out must be a non-empty directory path"),
    ({"input": ""}, "input must be a non-empty path"),
    ({"format": ()}, "format must be a non-empty list of distinct values among tokens, jsonl"),
    ({"format": ("tokens", "tokens")}, "format must be"),
    ({"format": ("parquet",)}, "format must be"),
    ({"text_field": ""}, "text_field must be a non-empty field name"),
    ({"executor": "slurm"}, "executor must be one of local, ray; got 'slurm'"),
    ({"workers": 0}, "workers must be an integer >= 1; got 0"),
    ({"workers": True}, "workers must be an integer >= 1"),
    ({"workers": 2.0}, "workers must be an integer >= 1"),
    ({"ray_address": ""}, "ray_address must be"),
    ({"on_error": "ignore"}, "on_error must be one of skip, fail; got 'ignore'"),
    ({"overwrite": "yes"}, "overwrite must be true or false"),
    ({"samples": -1}, "samples must be an integer >= 0; got -1"),
    ({"stages": {"gopher": {}}}, "unknown stage 'gopher'; expected one of normalize, language"),
    ({"stages": {"toxic": False}}, r"\[toxic\] must be a table of options"),
])
def test_validation_names_field_and_allowed_values(kwargs: dict, message: str) -> None:
    kwargs = {"out": "o", **kwargs}
    with pytest.raises(ValueError, match=message):
        PrepConfig(**kwargs)


def test_boundaries_just_in() -> None:
    assert PrepConfig(out="o", workers=1, samples=0).samples == 0


def test_load_toml_with_stage_tables_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "prep.toml"
    path.write_text('workers = 4\nformat = ["tokens", "jsonl"]\nout = "from-file"\n'
                    '[gopher_quality]\nmin_doc_words = 40\n[toxic]\nenabled = false\n')
    c = load_prep_config(path, input="corpus", workers=None, out=None)
    assert (c.workers, c.format, c.out, c.input) == (4, ("tokens", "jsonl"), "from-file", "corpus")
    assert c.stages == {"gopher_quality": {"min_doc_words": 40}, "toxic": {"enabled": False}}
    assert load_prep_config(path, workers=2, out="flag").workers == 2  # flags override the file


def test_load_json(tmp_path: Path) -> None:
    path = tmp_path / "prep.json"
    path.write_text(json.dumps({"out": "o", "on_error": "fail", "minhash_dedup": {"threshold": 0.7}}))
    c = load_prep_config(path)
    assert c.on_error == "fail" and c.stages == {"minhash_dedup": {"threshold": 0.7}}


@pytest.mark.parametrize("name, text, message", [
    ("p.toml", 'out = "o"\nworkrs = 2\n', "unknown key 'workrs'; expected one of input, out"),
    ("p.toml", 'out = "o"\ntoxic = 3\n', r"\[toxic\] must be a table"),
    ("p.toml", "out = \n", "invalid TOML"),
    ("p.toml", "workers = 2\n", "no output directory: set out in the file or pass --out"),
    ("p.toml", 'out = "o"\nworkers = 0\n', r"p\.toml: workers must be an integer >= 1"),
    ("p.json", "[1]", "expected a JSON object"),
    ("p.json", "{", "invalid JSON"),
    ("p.yaml", "out: o", r"expected a \.toml or \.json file"),
])
def test_load_errors_name_the_file_and_key(tmp_path: Path, name: str, text: str, message: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_prep_config(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"config .*nope\.toml: cannot read"):
        load_prep_config(tmp_path / "nope.toml")


def test_fingerprint_ignores_where_it_runs() -> None:
    a = PrepConfig(out="a", workers=1, executor="local")
    b = PrepConfig(out="b", workers=4, executor="ray", overwrite=True)
    assert a.fingerprint_fields() == b.fingerprint_fields()
    assert a.fingerprint_fields() != PrepConfig(out="a", stages={"toxic": {"enabled": False}}).fingerprint_fields()
