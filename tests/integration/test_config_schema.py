"""schemas/config.schema.json against the YAML files the loader (src/config.c) accepts and rejects.

Every examples/*.yaml and tests/unit/data/config/good/*.yaml must validate. Each bad fixture
tests/unit/data/config/bad/*.yaml that PyYAML can load must be rejected by the schema exactly when
its first lines carry the marker "# schema: reject" (the file is bad for a reason a schema can
express: unknown keys, wrong types, out-of-range numbers, patterns, required keys). Files bad only
for reasons the loader alone sees (undefined names, duration ranges, ${VAR} errors, duplicates)
carry no marker and must pass the schema, so the marker list stays honest.

${VAR} is expanded after loading, as the loader does, with dummy values; $${ is a literal ${.

The key tables themselves are compared with this schema and docs/configuration.md by
tests/unit/test_config.c: every section's key names in order (test_key_tables_match_schema), and
each connector's own tables (connectors/<kind>/<kind>_config.c) key by key — required keys, enum
values, integer ranges, defaults (test_connector_tables_match_schema).
"""

import pathlib
import re

import jsonschema
import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCHEMA_PATH = ROOT / "schemas" / "config.schema.json"
DATA = ROOT / "tests" / "unit" / "data" / "config"
DOCS = ROOT / "docs" / "configuration.md"
MARKER = "# schema: reject"

# A value that is one whole ${VAR} gets a dummy of the shape its key wants (the loader reads the
# expanded text as the key's type, so `batch_size: ${N}` is a number); a ${VAR} inside a longer
# string becomes "dummy".
INT_KEYS = {"batch_size", "max_concurrency", "maximum_retry_attempts", "max_receive_count",
            "maximum_concurrency", "starting_position_timestamp"}
BOOL_KEYS = {"enabled", "bisect_batch_on_function_error", "report_batch_item_failures"}
DURATION_KEYS = {"timeout", "maximum_event_age", "maximum_batching_window", "maximum_record_age",
                 "visibility_timeout"}
DEST_KEYS = {"on_success", "on_failure", "dead_letter"}
VAR = re.compile(r"\$\$\{|\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
WHOLE = re.compile(r"\$\{[A-Za-z_][A-Za-z0-9_]*\}")


def dummy(key, parent):
    if key in INT_KEYS:
        return 2
    if key in BOOL_KEYS:
        return False
    if key in DURATION_KEYS:
        return "60s"
    if key == "listen":
        return "127.0.0.1:9000"
    if key == "url":
        return "redis://localhost:6379/0" if parent.get("type") == "redis" else "http://localhost/"
    if key in DEST_KEYS:
        return "http://localhost/"
    return "dummy"


def expand(value, key=None, parent=None):
    if isinstance(value, str):
        if WHOLE.fullmatch(value):
            return dummy(key, parent or {})
        return VAR.sub(lambda m: "${" if m.group(0) == "$${" else "dummy", value)
    if isinstance(value, list):
        return [expand(v, key, parent) for v in value]
    if isinstance(value, dict):
        return {k: expand(v, k, value) for k, v in value.items()}
    return value


def load(path):
    with open(path, encoding="utf-8") as f:
        return expand(yaml.safe_load(f))


@pytest.fixture(scope="module")
def validator():
    import json

    with open(SCHEMA_PATH, encoding="utf-8") as f:
        schema = json.load(f)
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def good_files():
    files = sorted((ROOT / "examples").glob("*.yaml")) + sorted((DATA / "good").glob("*.yaml"))
    return [pytest.param(p, id=str(p.relative_to(ROOT))) for p in files]


def bad_files():
    return [pytest.param(p, id=p.name) for p in sorted((DATA / "bad").glob("*.yaml"))]


@pytest.mark.parametrize("path", good_files())
def test_good_file_matches_schema(validator, path):
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
              for e in validator.iter_errors(load(path))]
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("path", bad_files())
def test_bad_file_against_schema(validator, path):
    text = path.read_text(encoding="utf-8")
    marked = MARKER in text.splitlines()[:3]
    try:
        doc = expand(yaml.safe_load(text))
    except yaml.YAMLError:
        assert not marked, f"{path.name} is marked but PyYAML cannot load it"
        pytest.skip("not loadable YAML: only the loader can judge it")
    rejected = not validator.is_valid(doc)
    if marked:
        assert rejected, f"{path.name} is bad for schema-expressible reasons but the schema accepts it"
    else:
        assert not rejected, (f"the schema rejects {path.name}; add '{MARKER}' as its first line "
                              "if that is right: "
                              + "; ".join(e.message for e in validator.iter_errors(doc)))


def test_enough_fixtures():
    assert len(list((DATA / "good").glob("*.yaml"))) >= 3
    marked = [p for p in (DATA / "bad").glob("*.yaml") if MARKER in p.read_text().splitlines()[:3]]
    names = {p.name for p in marked}
    # The classes the schema must catch: unknown keys, wrong types, out-of-range numbers.
    assert {"unknown_key_top.yaml", "unknown_key_function.yaml", "unknown_key_mapping.yaml",
            "unknown_key_source.yaml", "wrong_type.yaml", "out_of_range.yaml"} <= names


def schema_keys(node, out):
    """Every key name declared under "properties" anywhere in the schema."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "properties" and isinstance(value, dict):
                out.update(value)
                for sub in value.values():
                    schema_keys(sub, out)
            else:
                schema_keys(value, out)
    elif isinstance(node, list):
        for value in node:
            schema_keys(value, out)
    return out


def test_docs_name_every_key():
    import json

    keys = schema_keys(json.loads(SCHEMA_PATH.read_text()), set())
    docs = DOCS.read_text(encoding="utf-8")
    missing = sorted(k for k in keys if f"`{k}`" not in docs)
    assert not missing, f"docs/configuration.md does not document: {missing}"
