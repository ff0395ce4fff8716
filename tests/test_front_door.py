"""The front door, ``attnkit/__init__.py``: every public name resolves to what it points at, and
``import attnkit`` stays light (no torch) until a name is used."""

import subprocess
import sys

import pytest

import attnkit

NAMES = sorted(attnkit._PUBLIC)


def _fresh(code: str) -> str:
    """Run ``code`` in a fresh interpreter (nothing of this test process imported) and return its stdout."""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.mark.parametrize("name", NAMES)
def test_every_public_name_resolves_to_its_target(name):
    import importlib

    module_name, _, attribute = attnkit._PUBLIC[name].partition(":")
    target = importlib.import_module(module_name)
    if attribute:
        target = getattr(target, attribute)
    assert getattr(attnkit, name) is target
    assert name in dir(attnkit) and name in attnkit.__all__


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'no_such_thing'"):
        attnkit.no_such_thing  # noqa: B018


def test_import_attnkit_does_not_import_torch():
    out = _fresh("import sys, attnkit; print(sorted(m for m in ('torch', 'transformers', 'numpy') if m in sys.modules))")
    assert out == "[]"


@pytest.mark.parametrize("feature", ["analyze", "check", "validate"])
def test_feature_packages_are_callable_whatever_was_imported_first(feature):
    # Python binds attnkit.<feature> to the package once any of its submodules is imported; the
    # package must still be callable as its main function, and still be the package.
    out = _fresh(f"import attnkit.{feature}.run, attnkit, inspect\n"
                 f"f = attnkit.{feature}\n"
                 f"print(callable(f), f is __import__('sys').modules['attnkit.{feature}'],"
                 f" inspect.ismodule(f), f.{feature} is f.run.{feature})")
    assert out == "True True True True"


def test_feature_call_equals_the_function():
    model, tokenizer = attnkit.load_model("reference")
    inputs = dict(tokenizer("In the beginning God created the heaven and the earth.", return_tensors="pt"))
    from attnkit.analyze.run import analyze

    assert attnkit.analyze(model, inputs).to_json() == analyze(model, inputs).to_json()
    assert attnkit.check(model, seq_len=64, dtype="bf16").to_json() == \
        attnkit.check.check(model, seq_len=64, dtype="bf16").to_json()


def test_load_model_gives_the_registry_model_and_tokenizer():
    from attnkit.common.loading.registry import load_model

    model, tokenizer = attnkit.load_model("reference", dtype="bfloat16")
    expected = load_model("reference")
    assert type(model) is type(expected.model) and not model.training
    assert next(model.parameters()).dtype.__str__() == "torch.bfloat16"
    assert tokenizer("In the beginning")["input_ids"] == expected.tokenizer("In the beginning")["input_ids"]


@pytest.mark.parametrize("call, message", [
    (lambda: attnkit.load_model("no-such-model"), "cannot find model 'no-such-model'"),
    (lambda: attnkit.load_model("./no/such/dir"), "does not exist"),
    (lambda: attnkit.load_model("reference", dtype="float13"), "unknown dtype 'float13'"),
], ids=["unknown-name", "missing-path", "unknown-dtype"])
def test_load_model_bad_input_is_one_line_user_error(call, message):
    with pytest.raises(attnkit.UserError) as raised:
        call()
    assert message in str(raised.value) and "\n" not in str(raised.value)
