"""A corpus of hostile and broken configs: YAML that is malformed, oversized,
self-referencing or ambiguous, values of the wrong kind, and bad ``--set`` items.

Each case goes through ``validate`` and through ``train`` with an earlier run's output
already in the output folder, and must end the same way: exit 2, one line naming the
file or the key, no traceback, and the earlier output byte for byte as it was.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from loraengine.cli.main import cli
from loraengine.core.errors import ConfigError

BASE = """\
model: {family: sd15, path: model}
training:
  steps: 2
  batch_size: 1
output:
  dir: out
  name: test
"""


def _laughs(levels: int, mapping: bool = False) -> str:
    """The billion-laughs document: each level an anchor holding nine aliases of the last."""
    lines = [BASE, 'l0: &l0 "lol"']
    for i in range(1, levels + 1):
        items = [f"*l{i - 1}"] * 9
        body = ("{" + ", ".join(f"k{j}: {a}" for j, a in enumerate(items)) + "}") if mapping \
            else "[" + ", ".join(items) + "]"
        lines.append(f"l{i}: &l{i} {body}")
    return "\n".join(lines) + "\n"


def _alias_chain(length: int) -> str:
    """Anchors each holding the one before: shallow text, a deep value."""
    lines = [BASE, "c0: &c0 [1]"]
    lines += [f"c{i}: &c{i} [*c{i - 1}]" for i in range(1, length)]
    return "\n".join(lines) + "\n"


# id -> (config text, --set items, what the one line must name)
YAML_CASES: dict[str, tuple[str, list[str], list[str]]] = {
    "duplicate-section": (BASE + "training:\n  steps: 3\n", [],
                          ["config.yaml:8", "duplicate key 'training'", "line 2"]),
    "duplicate-nested-key": (BASE.replace("  batch_size: 1\n", "  batch_size: 1\n  steps: 4\n"),
                             [], ["config.yaml:5", "duplicate key 'steps'", "line 3"]),
    "duplicate-flow-key": (BASE + "adapter: {rank: 2, rank: 4}\n", [],
                           ["config.yaml:8", "duplicate key 'rank'"]),
    "duplicate-quoted-key": (BASE + "loss: {name: mse, 'name': mse}\n", [],
                             ["duplicate key 'name'"]),
    "recursive-alias-mapping": (BASE + "x: &x {self: *x}\n", [],
                                ["config.yaml:8", "recursive alias"]),
    "recursive-alias-list": (BASE + "x: &x [1, *x]\n", [], ["config.yaml:8", "recursive alias"]),
    "recursive-alias-in-section": (BASE.replace("model: {", "model: &m {self: *m, "), [],
                                   ["config.yaml:1", "recursive alias"]),
    "nesting-500-lists": (BASE + "x: " + "[" * 500 + "]" * 500 + "\n", [],
                          ["config.yaml:8", "nested deeper than"]),
    "nesting-500-mappings": (BASE + "x: " + "{a: " * 500 + "1" + "}" * 500 + "\n", [],
                             ["config.yaml:8", "nested deeper than"]),
    "nesting-block-style": (BASE + "".join("  " * i + f"k{i}:\n" for i in range(200))
                            + "  " * 200 + "v: 1\n", [], ["nested deeper than"]),
    "nesting-through-aliases": (_alias_chain(300), [], ["config.yaml", "nested deeper than"]),
    "billion-laughs-lists": (_laughs(7), [], ["config.yaml", "aliases expand to more than"]),
    "billion-laughs-mappings": (_laughs(7, mapping=True), [],
                                ["config.yaml", "aliases expand to more than"]),
    "integer-5000-digits": (BASE.replace("steps: 2", "steps: " + "9" * 5000), [],
                            ["config.yaml:3", "integer of more than"]),
    "integer-100-digits-seed": (BASE.replace("steps: 2", "seed: " + "1" * 100), [],
                                ["integer of more than"]),
    "integer-long-hex": (BASE.replace("steps: 2", "steps: 0x" + "f" * 200), [],
                         ["config.yaml:3", "integer of more than"]),
    "integer-tagged-string": (BASE.replace("steps: 2", "steps: !!int '" + "7" * 5000 + "'"),
                              [], ["config.yaml:3", "integer of more than"]),
    "string-1mb": (BASE.replace("name: test", "name: " + "a" * (1 << 20)), [],
                   ["config.yaml:7", "characters (at most"]),
    "key-1mb": (BASE + "? " + "b" * (1 << 20) + "\n: 1\n", [],
                ["config.yaml:8", "characters (at most"]),
    "key-too-long": (BASE + "training2:\n  " + "k" * 300 + ": 1\n", [],
                     ["config.yaml:9", "a key of 300 characters"]),
    "undefined-alias": (BASE + "x: *nowhere\n", [], ["config.yaml:8", "not valid YAML"]),
    "unclosed-flow": (BASE + "x: [1, 2\n", [], ["config.yaml", "not valid YAML"]),
    "tab-indent": (BASE + "data:\n\tlatents: x\n", [], ["config.yaml:9", "not valid YAML"]),
    "python-object-tag": (BASE + "x: !!python/object/apply:os.system ['true']\n", [],
                          ["config.yaml:8", "not valid YAML"]),
    "bad-int-tag": (BASE + "x: !!int abc\n", [], ["config.yaml", "cannot read a value"]),
    "bad-binary-tag": (BASE + "x: !!binary '@@@'\n", [], ["config.yaml"]),
    "two-documents": (BASE + "---\nother: 1\n", [], ["config.yaml", "not valid YAML"]),
    "nul-byte-in-text": (BASE + "x: a\0b\n", [], ["config.yaml", "not valid YAML"]),
    "top-level-list": ("- model\n- training\n", [], ["config.yaml", "must be a mapping"]),
    "top-level-scalar": ("just words\n", [], ["config.yaml", "must be a mapping"]),
}

CONFIG_CASES: dict[str, tuple[str, list[str], list[str]]] = {
    "batch-size-true": (BASE.replace("batch_size: 1", "batch_size: true"), [],
                        ["training.batch_size", "'true'", "config.yaml:4"]),
    "steps-false": (BASE.replace("steps: 2", "steps: false"), [],
                    ["training.steps", "'false'"]),
    "seed-true": (BASE.replace("steps: 2", "seed: yes"), [], ["training.seed"]),
    "lr-true": (BASE + "optimizer: {name: adamw, lr: true}\n", [], ["optimizer.lr"]),
    "rank-true": (BASE + "adapter: {rank: true}\n", [], ["adapter.rank"]),
    "grad-norm-true": (BASE.replace("steps: 2", "max_grad_norm: true"), [],
                       ["training.max_grad_norm"]),
    "name-ansi-escape": (BASE.replace("name: test", 'name: "a\\e[31mred"'), [],
                         ["output.name", "U+001B", "config.yaml:7"]),
    "name-nul": (BASE.replace("name: test", 'name: "a\\0b"'), [], ["output.name", "U+0000"]),
    "name-newline": (BASE.replace("name: test", 'name: "a\\nb"'), [], ["output.name", "U+000A"]),
    "name-c1-control": (BASE.replace("name: test", 'name: "a\\x9bb"'), [],
                        ["output.name", "U+009B"]),
    "name-delete": (BASE.replace("name: test", 'name: "a\\x7fb"'), [],
                    ["output.name", "U+007F"]),
    "name-slash": (BASE.replace("name: test", "name: a/b"), [], ["output.name"]),
    "name-empty": (BASE.replace("name: test", "name: ''"), [], ["output.name"]),
    "long-value-echo-cut": (BASE.replace("batch_size: 1", "batch_size: " + "x" * 5000), [],
                            ["training.batch_size", "..."]),
    "section-not-mapping": (BASE + "data: 5\n", [], ["data"]),
    "model-a-list": (BASE.replace("model: {family: sd15, path: model}", "model: [sd15]"), [],
                     ["model: expected a mapping"]),
    "unknown-section": (BASE + "trainig: {steps: 2}\n", [], ["trainig: unknown key"]),
    # booleans inside lists (and tuples) where only numbers (or strings) may go
    "include-true": (BASE + "adapter: {include: [true]}\n", [], ["adapter.include.0"]),
    "exclude-false": (BASE + "adapter: {exclude: ['*.proj', no]}\n", [],
                      ["adapter.exclude.1"]),
    "betas-true": (BASE + "optimizer: {name: adamw, betas: [true, 0.99]}\n", [],
                   ["optimizer.betas.0", "'true'"]),
    "betas-second-false": (BASE + "optimizer: {name: adamw, betas: [0.9, false]}\n", [],
                           ["optimizer.betas.1", "'false'"]),
    "adafactor-eps-true": (BASE + "optimizer: {name: adafactor, eps: [null, true]}\n", [],
                           ["optimizer.eps.1", "'true'"]),
    "samples-size-true": (BASE.replace("  name: test", "  name: test\n  samples: {size: "
                                       "[true, 8]}"), [], ["output.samples.size.0", "'true'"]),
    "samples-size-huge": (BASE.replace("  name: test", "  name: test\n  samples: {size: "
                                       "[100000, 8]}"), [],
                          ["output.samples.size: height and width must be 1 to 2048 (latent "
                           "pixels), got [100000, 8]"]),
}

SET_CASES: dict[str, tuple[str, list[str], list[str]]] = {
    "set-empty-segment": (BASE, ["training..steps=5"],
                          ["--set 'training..steps=5'", "empty key segment"]),
    "set-leading-dot": (BASE, [".training.steps=5"], ["--set", "empty key segment"]),
    "set-trailing-dot": (BASE, ["training.steps.=5"], ["--set", "empty key segment"]),
    "set-only-dots": (BASE, ["..=5"], ["--set", "empty key"]),
    "set-empty-key": (BASE, ["=5"], ["--set '=5'", "empty key"]),
    "set-no-equals": (BASE, ["training.steps"], ["--set 'training.steps'", "key.path=value"]),
    "set-bool-for-int": (BASE, ["training.batch_size=true"],
                         ["training.batch_size", "(--set)"]),
    "set-bool-in-a-list": (BASE, ["optimizer.betas=[0.9, true]"],
                           ["optimizer.betas.1", "'true'", "(--set)"]),
    "set-deep-value": (BASE, ["data.x=" + "[" * 500], ["--set", "nested deeper than"]),
    "set-huge-integer": (BASE, ["training.steps=" + "9" * 5000],
                         ["--set", "integer of more than"]),
    "set-into-a-value": (BASE, ["training.steps.x=1"], ["--set", "'steps' is not a section"]),
    "set-ansi-name": (BASE, ["output.name=a\x1b[2Jb"], ["output.name", "U+001B", "(--set)"]),
    "set-recursive-alias": (BASE, ["data.x=&a [*a]"], ["--set", "recursive alias"]),
    "set-duplicate-key": (BASE, ["adapter={rank: 2, rank: 4}"],
                          ["--set", "duplicate key 'rank'"]),
    "set-long-key": (BASE, ["training." + "k" * 5000 + "=1"], ["--set", "...", "a key of more"]),
    "set-long-value-cut": (BASE, ["output.name=" + "\x1b" * 5000], ["output.name", "..."]),
}

ALL = {**YAML_CASES, **CONFIG_CASES, **SET_CASES}


def tree_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def earlier_output(tmp_path: Path) -> Path:
    """What an earlier run left in ``out/``: the adapter, its loss log, a checkpoint."""
    out = tmp_path / "out"
    (out / "test.checkpoints" / "step_1").mkdir(parents=True)
    (out / "test.safetensors").write_bytes(b"earlier adapter \x00\x01" * 64)
    (out / "test.loss.json").write_text('{"loss": [1.0]}')
    (out / "test.checkpoints" / "step_1" / "state.pt").write_bytes(b"\x02" * 256)
    return out


#: the megabyte-long inputs take about a second each: one command each in the fast
#: default (both in the full suite)
_SLOW_CELLS = {("key-1mb", "validate"), ("string-1mb", "train")}


@pytest.mark.parametrize(("case", "command"), [
    pytest.param(case, command, id=f"{case}-{command}",
                 marks=(pytest.mark.slow,) if (case, command) in _SLOW_CELLS else ())
    for case in ALL for command in ("validate", "train")])
def test_bad_config_is_one_line_and_leaves_the_output_alone(tmp_path, earlier_output,
                                                            case, command):
    text, overrides, needles = ALL[case]
    path = tmp_path / "config.yaml"
    path.write_text(text, encoding="utf-8")
    before = tree_hashes(earlier_output)
    args = [command, str(path)]
    for item in overrides:
        args += ["--set", item]
    if command == "train":
        args.append("--quiet")
    start = time.perf_counter()
    res = CliRunner().invoke(cli, args)
    took = time.perf_counter() - start
    assert res.exit_code == 2, (res.exit_code, res.output[:2000])
    assert "Traceback" not in res.output
    err = res.stderr.strip()
    assert len(err.splitlines()) == 1, err[:2000]
    assert err.startswith("error: ")
    for needle in needles:
        assert needle in err, err[:2000]
    assert len(err) < 400, err[:2000]  # echoed values are cut
    assert tree_hashes(earlier_output) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml", "out"]
    assert took < 5.0, took


def test_billion_laughs_is_refused_quickly(tmp_path, capsys):
    path = tmp_path / "laughs.yaml"
    path.write_text(_laughs(7), encoding="utf-8")
    runner = CliRunner()
    runner.invoke(cli, ["validate", str(tmp_path / "absent.yaml")])  # plugins loaded once
    start = time.perf_counter()
    res = runner.invoke(cli, ["validate", str(path)])
    took = time.perf_counter() - start
    with capsys.disabled():
        print(f"\nbillion laughs (7 levels) refused by validate in {took * 1000:.0f} ms")
    assert res.exit_code == 2 and "aliases expand to more than" in res.stderr
    assert took < 5.0, took  # under 0.1 s on an idle machine; generous for a loaded one


def test_aliases_within_the_limits_still_work(tmp_path):
    """Anchors and merge keys a config may use on purpose keep working."""
    path = tmp_path / "config.yaml"
    path.write_text(BASE + "defaults: &d {rank: 4, alpha: 2}\nadapter:\n  <<: *d\n  rank: 2\n"
                    .replace("defaults", "x-defaults"), encoding="utf-8")
    res = CliRunner().invoke(cli, ["validate", str(path)])
    assert "x-defaults: unknown key" in res.stderr  # the only problem: the extra section
    path.write_text(BASE + "adapter: &a {rank: 4}\nvalidation: {every: null}\n",
                    encoding="utf-8")
    assert CliRunner().invoke(cli, ["validate", "--syntax-only", str(path)]).exit_code == 0


def test_a_valid_base_config_validates(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(BASE, encoding="utf-8")
    res = CliRunner().invoke(cli, ["validate", "--syntax-only", str(path)])
    assert res.exit_code == 0, res.output


def test_nesting_just_inside_the_limit_is_read(tmp_path):
    """The limits leave room for any real config: 60 levels below a free-form option."""
    from loraengine.core.config.source import MAX_DEPTH

    deep = "[" * (MAX_DEPTH - 4) + "]" * (MAX_DEPTH - 4)
    path = tmp_path / "config.yaml"
    path.write_text(BASE + f"  samples: {{sampler_options: {{x: {deep}}}}}\n", encoding="utf-8")
    res = CliRunner().invoke(cli, ["validate", "--syntax-only", str(path)])
    assert res.exit_code == 0, res.output


def _refuse_composing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make composing a node graph an error: a document refused before it is reached."""
    from loraengine.core.config import source

    def compose(*args: object, **kwargs: object) -> None:
        raise AssertionError("the document was composed")

    monkeypatch.setattr(source.yaml, "compose", compose)


def test_a_large_config_without_aliases_is_too_many_values_not_aliases(tmp_path, monkeypatch):
    """200000 plain integers: the message says the file holds too many values (there is
    no alias to blame), and reading stops at the limit, before the graph is composed."""
    from loraengine.core.config.source import MAX_VALUES
    from loraengine.testing.harness import one_error_line

    path = tmp_path / "config.yaml"
    path.write_text(BASE + "x:\n" + "".join(f"- {i}\n" for i in range(200_000)),
                    encoding="utf-8")
    _refuse_composing(monkeypatch)
    err = one_error_line(CliRunner().invoke(cli, ["validate", str(path)]), 2)
    assert f"{path}:" in err
    assert f"the document holds more than {MAX_VALUES} values" in err
    assert "aliases" not in err
    # the line reading stopped at: about MAX_VALUES items in, not the whole file
    line = int(err.split(f"{path}:", 1)[1].split(":", 1)[0])
    assert MAX_VALUES - 100 < line < MAX_VALUES + 100, err  # of 200008 lines


@pytest.mark.parametrize("shape", ["block-list", "flow-list", "mapping", "nested"])
def test_too_many_values_as_written_names_the_file_and_line(shape, monkeypatch):
    from loraengine.core.config import source

    monkeypatch.setattr(source, "MAX_VALUES", 100)
    text = {
        "block-list": "x:\n" + "".join(f"- {i}\n" for i in range(200)),
        "flow-list": "x: [" + ", ".join(str(i) for i in range(200)) + "]\n",
        # each key and each value counts: 60 pairs are 121 values with the mapping
        "mapping": "".join(f"k{i}: {i}\n" for i in range(60)),
        "nested": "".join(f"s{i}: {{a: 1}}\n" for i in range(40)),
    }[shape]
    _refuse_composing(monkeypatch)
    with pytest.raises(ConfigError) as err:
        source.load_yaml(text, "big.yaml")
    assert str(err.value).startswith("big.yaml:")
    assert "the document holds more than 100 values" in str(err.value)


def test_exactly_the_limit_of_values_is_read(monkeypatch):
    from loraengine.core.config import source

    monkeypatch.setattr(source, "MAX_VALUES", 100)
    # the mapping, the key and the list: 3, then 97 items make 100
    data, _ = source.load_yaml("x: [" + ", ".join(["1"] * 97) + "]\n", "c.yaml")
    assert data == {"x": [1] * 97}
    with pytest.raises(ConfigError, match="holds more than 100 values"):
        source.load_yaml("x: [" + ", ".join(["1"] * 98) + "]\n", "c.yaml")


def test_aliases_over_the_limit_keep_the_alias_message(monkeypatch):
    """Few values as written, many once the aliases expand: the aliases are named."""
    from loraengine.core.config import source

    monkeypatch.setattr(source, "MAX_VALUES", 100)
    text = "a: &a [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]\nb: [" + ", ".join(["*a"] * 12) + "]\n"
    with pytest.raises(ConfigError) as err:
        source.load_yaml(text, "c.yaml")
    assert "aliases expand to more than 100 values" in str(err.value)
    assert "holds" not in str(err.value)


def test_a_set_item_of_too_many_values_names_the_set_item(tmp_path, monkeypatch):
    from loraengine.core.config import source
    from loraengine.testing.harness import one_error_line

    monkeypatch.setattr(source, "MAX_VALUES", 100)
    path = tmp_path / "config.yaml"
    path.write_text(BASE, encoding="utf-8")
    item = "data.x=[" + ", ".join(["1"] * 200) + "]"
    err = one_error_line(CliRunner().invoke(cli, ["validate", str(path), "--set", item]), 2)
    assert "--set 'data.x=[1, 1" in err
    assert "the document holds more than 100 values" in err
