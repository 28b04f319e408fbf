"""Fuzzing registry.toml through the CLI: random structures, keys, types, nesting, unicode, huge numbers,
missing stages, unknown components, parameters no component declares, damaged bytes.

Every case must either load (``prunekit pipelines`` lists it, ``prunekit run NAME`` gets as far as the job)
or end in one line ``prunekit: error: ...`` with exit status 2 naming the file and, for a mutated key,
that key; never another exception. In process (``prunekit.cli.main``), with the job itself stubbed out
(``run_job`` only records that the pipeline loaded); a few cases run as real processes to show that no
traceback reaches stderr.

``PRUNEKIT_FUZZ_EXAMPLES=N`` raises the number of cases; ``PRUNEKIT_FUZZ_LOG=FILE`` records outcomes.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import attrs
import pytest
from fuzzlog import examples, run_case
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import prunekit.runjob
from prunekit.cli import main
from prunekit.hookspecs import STAGES
from prunekit.pipeline import HostParams
from prunekit.registry import load_registry

ROOT = Path(__file__).resolve().parents[1]
REAL = load_registry(ROOT / "registry.toml")
REAL_TEXT = (ROOT / "registry.toml").read_text(encoding="utf-8")
HOST_KEYS = sorted(f.name for f in attrs.fields(HostParams))


FUZZ = settings(deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                                                    HealthCheck.data_too_large, HealthCheck.function_scoped_fixture])  # fmt: skip


def fuzz(n: int) -> settings:
    return settings(FUZZ, max_examples=examples(n))


# ---------------------------------------------------------------- TOML out of Python values


def toml_str(k: str) -> str:
    """A TOML basic string: any unicode; JSON's escapes are TOML's, plus DEL, which TOML wants escaped too."""
    return json.dumps(k, ensure_ascii=False).replace("\x7f", "\\u007f")


toml_key = toml_str


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return toml_str(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{toml_key(k)} = {toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(type(v))


def to_toml(doc: dict[str, Any]) -> str:
    return "".join(f"{toml_key(k)} = {toml_value(v)}\n" for k, v in doc.items())


TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=12)
KEY = st.one_of(TEXT, st.sampled_from(["n", "sparsity", "block", "params", "é", "键", "a.b", "", " ", "\u0000x"]))
SCALAR = st.one_of(
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.sampled_from([0, -1, 1, 2**31, 2**63, 10**30, -(10**30)]),
    st.floats(allow_nan=True, allow_infinity=True),
    TEXT,
)
VALUE = st.recursive(SCALAR, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEY, inner, max_size=4), max_leaves=12)


# ---------------------------------------------------------------- cases: a real pipeline, mutated


def real_doc(name: str) -> dict[str, Any]:
    spec = REAL.pipelines[name]
    body: dict[str, Any] = dict(spec.components())
    body["description"] = spec.description
    body["params"] = dict(spec.params)
    doc: dict[str, Any] = {"default": name, "pipelines": {name: body}}
    doc["distributions"] = {d: {"path": s.path, "provides": list(s.provides)} for d, s in REAL.distributions.items() if s.path}
    return doc


MUTATIONS = ("param-value", "param-unknown", "param-remove-all", "params-not-table", "stage-remove", "stage-value",
             "stage-unknown-component", "stage-extra", "optional-half", "pipeline-not-table", "pipelines-value",
             "default-value", "description-value", "distribution-value", "deep-nesting", "many")  # fmt: skip


@st.composite
def mutated(draw: st.DrawFn) -> tuple[str, str, str | None]:
    """(toml text, pipeline name, the key the message must name or None)."""
    name = draw(st.sampled_from(sorted(REAL.pipelines)))
    doc = real_doc(name)
    body = doc["pipelines"][name]
    kind = draw(st.sampled_from(MUTATIONS))
    key: str | None = None
    if kind == "param-value":
        known = sorted(set(body["params"]) | set(HOST_KEYS))
        key = draw(st.sampled_from(known))
        body["params"][key] = draw(VALUE)
    elif kind == "param-unknown":
        key = draw(KEY.filter(lambda k: k not in body["params"] and k not in HOST_KEYS and k.strip() == k and k.isprintable() and k))
        body["params"][key] = draw(VALUE)
    elif kind == "param-remove-all":
        body["params"] = {}
    elif kind == "params-not-table":
        body["params"], key = draw(SCALAR | st.lists(SCALAR, max_size=3)), "params"
    elif kind == "stage-remove":
        key = draw(st.sampled_from([s for s in STAGES if s in body]))
        del body[key]
    elif kind == "stage-value":
        key = draw(st.sampled_from([s for s in STAGES if s in body]))
        body[key] = draw(VALUE)
    elif kind == "stage-unknown-component":
        key = draw(st.sampled_from([s for s in STAGES if s in body]))
        body[key] = draw(TEXT.filter(lambda t: t not in {body.get(s) for s in STAGES}))
    elif kind == "stage-extra":
        key = draw(KEY.filter(lambda k: k not in body and k.isprintable() and k.strip() == k and k))
        body[key] = draw(VALUE)
    elif kind == "optional-half":
        key = draw(st.sampled_from(["layout", "kernel"]))
        body.pop("layout", None) if key == "kernel" else body.pop("kernel", None)
        body[key] = draw(st.sampled_from(["csr", "pack-1xn", "cpu-1xn", "triton-block"]))
    elif kind == "pipeline-not-table":
        doc["pipelines"][name] = draw(SCALAR | st.lists(SCALAR, max_size=3))
        key = name
    elif kind == "pipelines-value":
        doc["pipelines"] = draw(SCALAR | st.lists(VALUE, max_size=3) | st.just({}))
        key = "pipelines"
    elif kind == "default-value":
        doc["default"] = draw(VALUE)
        key = "default"
    elif kind == "description-value":
        body["description"] = draw(VALUE)
        key = "description"
    elif kind == "distribution-value":
        doc["distributions"] = draw(VALUE | st.dictionaries(TEXT, VALUE, max_size=2))
    elif kind == "deep-nesting":
        value: Any = draw(SCALAR)
        for k in draw(st.lists(KEY, min_size=3, max_size=12)):
            value = {k: value} if draw(st.booleans()) else [value]
        key = draw(st.sampled_from(sorted(body["params"]) or ["sparsity"]))
        body["params"][key] = value
    else:  # several at once: any message will do, it only must be one line
        for k in draw(st.lists(st.sampled_from(sorted(set(body["params"]) | set(HOST_KEYS))), max_size=5)):
            body["params"][k] = draw(VALUE)
        body.update(draw(st.dictionaries(st.sampled_from(list(STAGES)), TEXT, max_size=2)))
    return to_toml(doc), name, key


@st.composite
def damaged(draw: st.DrawFn) -> tuple[bytes, str]:
    """The real registry's bytes, truncated, bit-flipped, with bytes inserted (invalid UTF-8 too)."""
    data = bytearray(REAL_TEXT.encode())
    how = draw(st.sampled_from(("truncate", "flip", "insert", "garbage")))
    if how == "truncate":
        data = data[: draw(st.integers(0, len(data)))]
    elif how == "flip":
        for _ in range(draw(st.integers(1, 8))):
            i = draw(st.integers(0, len(data) - 1))
            data[i] ^= 1 << draw(st.integers(0, 7))
    elif how == "insert":
        i = draw(st.integers(0, len(data)))
        data[i:i] = draw(st.binary(min_size=1, max_size=16))
    else:
        data = bytearray(draw(st.binary(max_size=200)))
    return bytes(data), how


# ---------------------------------------------------------------- the oracle


class Loaded(BaseException):
    """run_job stub: the pipeline loaded (and the CLI reached the job). A BaseException: the CLI turns any
    Exception into an internal error, exit 70."""


@pytest.fixture
def stub_job(monkeypatch):
    def fake(pipe, **_kw):
        raise Loaded(pipe.name)

    monkeypatch.setattr(prunekit.runjob, "run_job", fake)


def cli(argv: list[str], capsys) -> tuple[int | str, str]:
    """Exit status (or 'loaded') and stderr of one in-process CLI call; any other exception is a failure."""
    try:
        code = main(argv)
    except Loaded:
        code = "loaded"
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except Exception as exc:
        raise AssertionError(f"prunekit {' '.join(argv)}: {type(exc).__name__}: {exc}") from exc
    return code, capsys.readouterr().err


def assert_clean(code: int | str, err: str, path: Path, key: str | None, what: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    if code in (0, "loaded"):
        assert "Traceback" not in err, err
        return "loaded" if code == "loaded" else "listed"
    assert code == 2, f"{what}: exit {code}: {err!r}"
    assert len(lines) == 1 and lines[0].startswith("prunekit: error: "), f"{what}: not one error line: {err!r}"
    assert str(path) in lines[0], f"{what}: the message does not name the file: {lines[0]!r}"
    if key is not None and key.isprintable() and key.strip():
        assert key in lines[0] or repr(key)[1:-1] in lines[0], f"{what}: the message does not name {key!r}: {lines[0]!r}"
    return "error"


def check_registry(path: Path, name: str | None, key: str | None, capsys) -> str:
    code, err = cli(["pipelines", "--registry", str(path)], capsys)
    listed = assert_clean(code, err, path, key if code != 0 else None, "pipelines")
    if name is None or listed == "error":
        return listed
    code, err = cli(["run", name, "--registry", str(path), "--no-progress"], capsys)
    return assert_clean(code, err, path, key, f"run {name}")


@fuzz(150)
@given(case=mutated())
def test_mutated_registry_loads_or_names_the_key(case, tmp_path_factory, stub_job, capsys):
    text, name, key = case
    path = tmp_path_factory.mktemp("reg") / "registry.toml"
    path.write_text(text, encoding="utf-8")
    run_case("registry", check_registry, path, name, key, capsys)


@fuzz(60)
@given(case=damaged())
def test_damaged_registry_bytes_load_or_fail_in_one_line(case, tmp_path_factory, stub_job, capsys):
    data, _how = case
    path = tmp_path_factory.mktemp("reg") / "registry.toml"
    path.write_bytes(data)
    run_case("registry", check_registry, path, REAL.default, None, capsys)


@fuzz(40)
@given(doc=st.dictionaries(KEY, VALUE, max_size=4) | st.fixed_dictionaries({"pipelines": st.dictionaries(KEY, VALUE, max_size=3)}))
def test_random_documents_load_or_fail_in_one_line(doc, tmp_path_factory, stub_job, capsys):
    path = tmp_path_factory.mktemp("reg") / "registry.toml"
    path.write_text(to_toml(doc), encoding="utf-8")
    name = next(iter(doc["pipelines"]), None) if isinstance(doc.get("pipelines"), dict) else None
    assume(name is None or isinstance(name, str))
    run_case("registry", check_registry, path, name, None, capsys)


def test_registry_path_that_is_a_directory_or_unreadable(tmp_path, stub_job, capsys):
    for path in (tmp_path, tmp_path / "missing.toml"):
        code, err = cli(["pipelines", "--registry", str(path)], capsys)
        assert assert_clean(code, err, path, None, "pipelines") == "error"


@pytest.mark.parametrize(
    "text",
    [
        b"\xff\xfe[pipelines.x]\n",  # not UTF-8: was a UnicodeDecodeError traceback
        b'[pipelines.x]\nschedule = "a"\nscore = "b"\nselect = "c"\n[pipelines.x.params]\nn = 1e400\n',
        b'default = 7\n[pipelines.x]\nschedule = "constant"\nscore = "magnitude"\nselect = "threshold"\n',
    ],
)
def test_no_traceback_reaches_stderr_of_a_real_process(tmp_path, text):
    reg = tmp_path / "registry.toml"
    reg.write_bytes(text)
    res = subprocess.run([sys.executable, "-m", "prunekit", "run", "x", "--registry", str(reg)], capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    assert res.returncode == 2, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip() and "cpp_extension" not in ln]
    assert "Traceback" not in res.stderr and len(lines) == 1 and lines[0].startswith("prunekit: error: "), res.stderr
