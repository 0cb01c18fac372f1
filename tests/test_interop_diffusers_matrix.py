"""loraengine's files in diffusers for every algorithm and option, read live by
diffusers' own pipeline loader (a pip package, so CI runs it: no fixture).

For each case of test_merge_matrix.MATRIX (and the two constraint-only OFT/BOFT cases
of the ComfyUI matrix) and each family — the SD1.5- and SDXL-structured tiny UNets,
the tiny SD3 and FLUX.1 transformers, the same seeded models and networks as
tests/test_interop_comfyui_matrix.py (``make_comfyui_matrix_fixtures``: every layer the
algorithm adapts, alpha 3, norm and bias deltas where the case asks) — the network is
written by the ``diffusers`` exporter (and, on the UNets, by ``kohya``, which diffusers
reads too), loaded into the family's real pipeline object with
``pipe.load_lora_weights(file)``, fused with ``pipe.fuse_lora()``, and every weight and
bias of the fused model is compared with loraengine's merge of the same network into a
fresh model. A cell records:

- ``refused``: diffusers' ValueError (it loads nothing of such a file), else None;
- ``unloaded``: the file keys diffusers did not place (all of them when it refused;
  else those its warnings list as unexpected or ignored: it skips some, such as FLUX.1's
  bias deltas, without a word, which ``unchanged`` shows);
- ``max_rel``: max over tensors of max |W_diffusers − W_ours| / max |W_ours|;
- ``changed``/``unchanged``: tensors our merge changes, and those diffusers left as
  they were.

A cell is exact when nothing is refused, unloaded or left unchanged and ``max_rel`` ≤
1e-4: as in test_interop_comfyui_matrix, each element of W + ΔW sums at most
n = 64·9 = 576 fp32 products, and two programs summing in different orders differ by at
most γ_n ≈ n·u ≈ 3.4e-5 (u = 2⁻²⁴) of the terms' magnitudes, under 1e-4 of max |W|.
Every other cell must be a limit the exporter's ``limits`` (what ``train`` warns with as
``warning: adapter.exporter: diffusers …``) names for that file.

``python tests/test_interop_diffusers_matrix.py --table`` prints docs/compatibility.md's
"diffusers: every algorithm and option" table, measured afresh.
"""

from __future__ import annotations

import re
import sys
from functools import cache
from pathlib import Path

import pytest
import torch
from conftest import fixture_script

HERE = Path(__file__).parent / "fixtures" / "interop"
EXACT = 1e-4
#: family -> the exporters whose files diffusers reads there
FAMILIES = {"sd15": ("diffusers", "kohya"), "sdxl": ("diffusers", "kohya"),
            "sd3": ("diffusers",), "flux": ("diffusers",)}
LABELS = {"sd15": "SD1.5", "sdxl": "SDXL", "sd3": "SD3", "flux": "FLUX.1"}
PIPELINES = {"sd15": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline",
             "sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}
#: diffusers' notes about pipeline parts these tiny pipelines do not have (no text
#: encoder): not about the file
IGNORED = ("No LoRA keys associated to NoneType",)


@pytest.fixture(autouse=True)
def _one_thread():
    """The errors in the table are float rounding, which depends on how many threads a
    product is split over: measure with one, as the ``--table`` run does (an earlier
    in-process ``train`` may have set another count)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _script():
    return fixture_script("make_comfyui_matrix_fixtures")


MAKE = _script()
MAKE.setup_path()
CASES = {MAKE.case_id(*c): c for c in MAKE.cases()}
CELLS = [(f, e) for f, exporters in FAMILIES.items() for e in exporters]


def pipeline(family: str, model):
    """The family's real diffusers pipeline object holding only ``model`` (its UNet or
    transformer) and a scheduler: enough for ``load_lora_weights``/``fuse_lora``."""
    import diffusers as d

    cls = getattr(d, PIPELINES[family])
    code = cls.__init__.__code__
    parts = {n: None for n in code.co_varnames[1:code.co_argcount]}
    if family in MAKE.UNETS:
        parts.update(unet=model, scheduler=d.EulerDiscreteScheduler(steps_offset=1))
    else:
        parts.update(transformer=model, scheduler=d.FlowMatchEulerDiscreteScheduler())
    if "requires_safety_checker" in parts:
        parts["requires_safety_checker"] = False
    return cls(**parts)


def _unexpected(lines: list[str]) -> int:
    """How many file keys diffusers' warnings name as not placed (PEFT's unexpected
    keys; the norm keys its FLUX.1 loader says it ignores)."""
    n = 0
    for line in lines:
        if "unexpected keys" in line or "will be ignored" in line:
            n += len(re.findall(r"[\w.]+\.(?:weight|bias|alpha|\w+)\b",
                                line.split(":", 1)[-1]))
    return n


@cache
def _base(family: str) -> dict[str, torch.Tensor]:
    return MAKE.diffusers_model(family).state_dict()


def _structure(model) -> list[tuple[str, type]]:
    return [(name, type(module)) for name, module in model.named_modules()]


#: per family, a model built once and put back as built after each use (building a UNet
#: takes a third as long as measuring a cell)
_KEPT: dict[str, torch.nn.Module] = {}


def _as_built(family: str):
    """The family's model as :func:`MAKE.diffusers_model` builds it: the one kept, or a
    new one when none is (the caller hands it back with :func:`_hand_back`)."""
    model = _KEPT.pop(family, None)
    if model is None:
        model = MAKE.diffusers_model(family)
        _STRUCTURE.setdefault(family, _structure(model))
    return model


def _hand_back(family: str, model) -> None:
    """Keep ``model`` for the next :func:`_as_built` if its modules are those of a new
    one (diffusers' ``unload_lora_weights`` took its LoRA layers out, our merge adds
    none), with the weights copied back from a new one's; else let it go."""
    base, now = _base(family), model.state_dict()
    if family not in _KEPT and _structure(model) == _STRUCTURE[family] \
            and list(now) == list(base):
        with torch.no_grad():
            for key, tensor in now.items():
                tensor.copy_(base[key])
        _KEPT[family] = model


#: per family, the modules of a new model (what :func:`_hand_back` compares with)
_STRUCTURE: dict[str, list[tuple[str, type]]] = {}


@cache
def our_case(family: str, cid: str):
    """(our merged state dict, the files per exporter, each file's modules as the
    exporter's ``limits`` takes them) for case ``cid`` on ``family``."""
    return _our_case(family, cid)


def _our_case(family: str, cid: str):
    import test_merge_matrix as mm

    from loraengine.core.files import in_layout, module_layouts

    model = _as_built(family)
    network, _ = MAKE.build_network(model, *CASES[cid])
    layouts = module_layouts(mm.REG, model)
    modules = network.file_modules()
    layers = dict(network.items())
    files, summaries = {}, {}
    for name in FAMILIES[family]:
        exporter = mm.REG.get("exporter", name)
        renamed = in_layout(modules, exporter, layouts)
        files[name] = {k: v.contiguous() for k, v in exporter.to_file(renamed).items()}
        names = dict(zip(modules, renamed, strict=True))
        # as ``core/checks.py`` hands them to ``limits`` for ``train``'s warning
        summaries[name] = {
            names[p]: ("deltas" if p not in layers else layers[p].algorithm,
                       {k: tuple(v.shape) for k, v in params.items()})
            for p, params in modules.items()}
    network.merge()
    merged = {k: v.clone() for k, v in model.state_dict().items()}
    _hand_back(family, model)
    return merged, files, summaries


def limits_of(exporter: str, cid: str, summary: dict) -> list[str]:
    """What ``train`` warns with for this file (``adapter.exporter``'s ``limits``, given
    the metadata the run adds to the file, as ``core/checks.py`` gives it)."""
    import test_merge_matrix as mm

    spec = mm.REG.get("exporter", exporter)
    name, options, _ = CASES[cid]
    return list(spec.limits(summary, metadata=mm.file_notes(name, options)))


#: rows measured in this process, by (family, exporter, case): the docs' table reuses
#: those the matrix test measured
ROWS: dict[tuple[str, str, str], dict] = {}
#: each measured file's modules as the exporter's ``limits`` takes them, by (family,
#: exporter, case)
SUMMARIES: dict[tuple[str, str, str], dict] = {}


def run_cell(family: str, exporter: str, cid: str, folder: Path) -> dict:
    """One file through diffusers' pipeline loader: the row of the table (the files of
    every exporter of the family are measured together, from one merge of ours)."""
    if (family, exporter, cid) not in ROWS:
        want, files, summaries = _our_case(family, cid)
        for name, tensors in files.items():
            ROWS[family, name, cid] = _measure(family, name, tensors, want, folder)
            SUMMARIES[family, name, cid] = summaries[name]
    return ROWS[family, exporter, cid]


def _measure(family: str, exporter: str, tensors: dict, want: dict, folder: Path) -> dict:
    from conftest import diffusers_warnings
    from safetensors.torch import save_file

    path = folder / f"{family}-{exporter}.safetensors"
    save_file(tensors, str(path))
    pipe = pipeline(family, _as_built(family))
    refused = None
    # at warning level whatever an earlier run in this process set diffusers' logger to
    # (loading a model through the engine sets it to errors only)
    with diffusers_warnings() as captured:
        try:
            pipe.load_lora_weights(str(path), adapter_name="ours")
            pipe.fuse_lora()
        except (ValueError, IndexError) as e:  # what diffusers raises on keys it cannot place
            refused = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:160]}"
    lines = [line for line in captured if not line.startswith(IGNORED)]
    model = pipe.unet if family in MAKE.UNETS else pipe.transformer
    theirs = model.state_dict()
    base = _base(family)
    worst, where, changed, unchanged = 0.0, "", 0, 0
    for key, w in want.items():
        head, _, leaf = key.rpartition(".")
        got = theirs.get(key, theirs.get(f"{head}.base_layer.{leaf}"))
        assert got is not None, key
        if not torch.equal(w, base[key]):
            changed += 1
            unchanged += torch.equal(got, base[key])
        err = float((got - w).abs().max() / w.abs().max().clamp_min(1e-30))
        if err > worst:
            worst, where = err, key
    pipe.unload_lora_weights()  # as a user takes one LoRA out before loading the next
    _hand_back(family, model)
    return {"keys": len(tensors), "refused": refused,
            "unloaded": len(tensors) if refused else _unexpected(lines),
            "warnings": lines[:2], "max_rel": worst, "worst": where, "changed": changed,
            "unchanged": unchanged}


def exact(row: dict) -> bool:
    return row["refused"] is None and not row["unloaded"] and not row["unchanged"] \
        and row["max_rel"] <= EXACT


def diffusers_lines(exporter: str, family: str, cid: str) -> list[str]:
    """The limits ``train`` warns with for this file that are diffusers'."""
    summary = SUMMARIES.get((family, exporter, cid))
    if summary is None:
        summary = our_case(family, cid)[2][exporter]
    return [line for line in limits_of(exporter, cid, summary) if line.startswith("diffusers")]


#: cells measured exact that must stay so: LoRA everywhere, DoRA in the diffusers export
#: (PEFT's lora_magnitude_vector; the kohya file's dora_scale is dropped, a warned limit)
MUST_BE_EXACT = {"lora-r4": ("diffusers", "kohya"), "lora-rs_lora=True-r4": ("diffusers", "kohya"),
                 "lora-weight_decompose=True-r4": ("diffusers",),
                 "lora-rs_lora=True-weight_decompose=True-r3": ("diffusers",)}


def check(family: str, exporter: str, cid: str, folder: Path) -> dict:
    row = run_cell(family, exporter, cid, folder)
    assert row["changed"] > 0, (family, exporter, cid)
    if exporter in MUST_BE_EXACT.get(cid, ()):
        assert exact(row), (family, exporter, cid, row)
    elif not exact(row):
        assert diffusers_lines(exporter, family, cid), (family, exporter, cid, row)
    return row


#: a fast, representative subset (LoRA in both exports, one algorithm diffusers
#: refuses), checked here; every case, these included, is checked by the docs-table
#: test below (one measurement of each cell serves both in one process)
FAST = ("lora-r4", "loha-r4")


@pytest.mark.parametrize("cid", FAST)
def test_every_cell_is_exact_or_a_diffusers_limit_the_export_warns_about(cid, tmp_path):
    """Per family and exporter: diffusers' fused weights equal our merge (≤ 1e-4, every
    key placed), or the exporter's limits (what ``train`` warns with) name what diffusers
    does not read of this file."""
    for family, exporter in CELLS:
        check(family, exporter, cid, tmp_path)


def check_all(folder: Path) -> list[str]:
    """:func:`check` on every case and cell; the failures, one line each."""
    failures = []
    for cid in CASES:
        for family, exporter in CELLS:
            try:
                check(family, exporter, cid, folder)
            except AssertionError as e:
                failures.append(f"{family} {exporter} {cid}: {str(e)[:300]}")
    return failures


def test_the_matrix_covers_every_merge_case():
    import test_merge_matrix as mm

    assert {MAKE.case_id(*mm._values(c)) for c in mm.MATRIX} <= set(CASES)


@pytest.mark.parametrize(("exporter", "options", "start"), [
    ("kohya", {"algorithm": "lora", "weight_decompose": True},
     "diffusers drops DoRA's magnitude (dora_scale) of a kohya file"),
    ("kohya", {"algorithm": "loha"}, "diffusers reads only LoRA from a kohya file"),
    ("diffusers", {"algorithm": "full"}, "diffusers reads no full ΔW or bias/norm delta")],
    ids=["kohya-dora", "kohya-loha", "diffusers-full"])
def test_train_warns_about_what_diffusers_does_not_read(exporter, options, start):
    """The limits the matrix found, as ``train`` gives them (one warning line each)."""
    from loraengine.plugins import build_plugin_manager
    from loraengine.testing.harness import train_tiny

    overlay = {"adapter": {**options, "rank": 2, "exporter": exporter}}
    with pytest.warns(UserWarning, match=rf"adapter.exporter: {re.escape(start)}"):
        train_tiny(build_plugin_manager(), overlay)


# -- the docs' table ---------------------------------------------------------------------

def note(line: str) -> str:
    """A limit's line without its counts, examples and algorithm names (one note for
    every cell)."""
    return re.sub(r"these layers of [\w, ]+ are", "these layers are", MAKE.note(line))


def cell(row: dict, limits: list[str], notes: list[str]) -> str:
    """``unloaded · max rel error`` (``refused`` where diffusers loads nothing), and the
    warned diffusers limits that explain a cell that is not exact, as note numbers."""
    err = f"{row['max_rel']:.2g}" if row["max_rel"] else "0"
    text = f"refused ({row['unloaded']} keys)" if row["refused"] else \
        f"{row['unloaded']} · {err}"
    if exact(row):
        return text
    refs = []
    for line in limits:
        line = note(line)
        if line not in notes:
            notes.append(line)
        refs.append(str(notes.index(line) + 1))
    return f"{text} ({', '.join(refs)})" if refs else f"{text} (no warning)"


def table(folder: Path) -> str:
    """The markdown table of docs/compatibility.md, measured now."""
    notes: list[str] = []
    out = ["| algorithm, options, rank | " +
           " | ".join(f"{LABELS[f]} `{e}`" for f, e in CELLS) + " |",
           "|---" * (len(CELLS) + 1) + "|"]
    for cid in CASES:
        cells = [cell(run_cell(f, e, cid, folder), diffusers_lines(e, f, cid), notes)
                 for f, e in CELLS]
        out.append(f"| `{cid}` | " + " | ".join(cells) + " |")
    out.append("")
    out += [f"{i}. {n}" for i, n in enumerate(notes, 1)]
    return "\n".join(out) + "\n"


@pytest.mark.slow
def test_the_docs_show_the_measured_table_and_every_cell_is_exact_or_warned(tmp_path):
    """docs/compatibility.md's diffusers matrix is what diffusers does today, measured
    as ``--table`` makes it (the cells the test above measured in this process are
    not measured again), and every cell of every case holds to :func:`check` (exact,
    or a warned limit), as ``--table --check`` asks."""
    docs = at_rounding((Path(__file__).parents[1] / "docs" / "compatibility.md").read_text())
    measured = at_rounding(table(tmp_path))
    shown = [line for line in docs.splitlines() if line.startswith("| ")]
    assert measured in docs, [line for line in measured.splitlines()
                              if line.startswith("| ") and line not in shown]
    assert check_all(tmp_path) == []


#: A cell's relative error below this is fp32 rounding: our merge and diffusers' fuse
#: each round every weight once or twice (2⁻²⁴ ≈ 6e-8 each), so such errors are a few
#: units in the last place, and which few depends on the CPU's matrix kernels (the
#: same code reads 1.5e-07 on one machine and 1.6e-07 on another).
ROUNDING = 1e-6
#: a cell's error (after ``unloaded · ``) of 0 or under ``ROUNDING`` in ``cell``'s format
_SMALL = re.compile(r"(?<=· )(?:0|\d(?:\.\d+)?e-(?:0[7-9]|[1-9]\d))(?= |$)")


def at_rounding(text: str) -> str:
    """``text`` with every cell's error that is 0 or under ``ROUNDING`` written as
    ``<1e-06``: the table is compared with the docs to that precision (counts,
    refusals, notes and larger errors exactly; ``check_all`` still holds every cell to
    exact or warned)."""
    return "\n".join(_SMALL.sub("<1e-06", line) for line in text.split("\n"))


def test_errors_under_rounding_compare_equal_and_larger_ones_do_not():
    assert at_rounding("| 0 · 1.5e-07 | 0 · 2.2e-07 | 3 · 0 |") == \
        at_rounding("| 0 · 1.6e-07 | 0 · 9.9e-08 | 3 · 7.2e-08 |")
    assert at_rounding("| 0 · 1.5e-06 |") != at_rounding("| 0 · 1.6e-06 |")
    assert at_rounding("| 0 · 0.031 | 256 · 0.64 (1) |") == "| 0 · 0.031 | 256 · 0.64 (1) |"
    assert at_rounding("| 0 · 1.5e-07 |") != at_rounding("| 1 · 1.5e-07 |")
    assert at_rounding("| refused (1405 keys) (5) |") == "| refused (1405 keys) (5) |"


if __name__ == "__main__":
    import tempfile

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        if "--table" in sys.argv:
            print(table(Path(tmp)), end="")
            failed = check_all(Path(tmp)) if "--check" in sys.argv else []
            for line in failed:
                print(line, file=sys.stderr)
            sys.exit(1 if failed else 0)
        else:
            for cid in [a for a in sys.argv[1:]] or CASES:
                for family, exporter in CELLS:
                    row = run_cell(family, exporter, cid, Path(tmp))
                    print(f"{family:4s} {exporter:9s} {cid:55s} exact {exact(row)!s:5s} "
                          f"{row} warned {diffusers_lines(exporter, family, cid)}",
                          flush=True)
