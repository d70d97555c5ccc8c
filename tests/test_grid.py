"""Grid files: expansion, derived granularity/expansion axes, exclude expressions, validation."""

from pathlib import Path

import pytest
import yaml

from moe_scaling.errors import ConfigError
from moe_scaling.sweep.exclude import compile_exclude
from moe_scaling.sweep.grid import expand_grid, load_grid, resolve_corpus

ISSUE_EXAMPLE = """
name: example
data:  {corpus: stdlib, seq_len: 128}
model: {d_model: 64, n_layers: 2, n_heads: 4, n_kv_heads: 2, d_ff: 256}
train: {tokens: 500000, batch_size: 16, lr: 0.003}
grid:  {n_experts: [4, 8, 16], top_k: [1, 2], n_shared: [0, 1]}
zip:   {d_model: [64, 128], n_layers: [2, 4]}
exclude: ["top_k > n_experts"]
seeds: [0]
"""


def write(tmp_path: Path, text: str | dict, name: str = "grid.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text if isinstance(text, str) else yaml.safe_dump(text))
    return path


def grid(tmp_path, **sections):
    base = {"name": "t", "model": {"d_model": 64, "n_layers": 2, "n_heads": 4, "d_ff": 256},
            "train": {"tokens": 100000}}
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = base[key] | value
        else:
            base[key] = value
    return expand_grid(load_grid(write(tmp_path, base)))


def test_issue_example_expands_to_the_cartesian_product_times_zip(tmp_path):
    runs = expand_grid(load_grid(write(tmp_path, ISSUE_EXAMPLE)))
    assert len(runs) == 3 * 2 * 2 * 2
    first = runs[0]
    assert (first.model.n_experts, first.model.top_k, first.model.n_shared) == (4, 1, 0)
    assert (first.model.d_model, first.model.n_layers) == (64, 2)
    assert first.model.vocab_size == 256 and first.data.seq_len == 128 and first.train.lr == 0.003
    # zip varies fastest after the grid axes: d_model and n_layers move together
    assert [(r.model.d_model, r.model.n_layers) for r in runs[:2]] == [(64, 2), (128, 4)]
    assert len({r.run_id for r in runs}) == len(runs)


def test_run_ids_are_deterministic_and_depend_on_every_field(tmp_path):
    a = grid(tmp_path, grid={"lr": [1e-3, 2e-3]})
    b = grid(tmp_path, grid={"lr": [1e-3, 2e-3]})
    assert [r.run_id for r in a] == [r.run_id for r in b]
    assert a[0].run_id != a[1].run_id
    c = grid(tmp_path, grid={"lr": [1e-3]}, seeds=[1])
    assert c[0].run_id != a[0].run_id and c[0].train.seed == 1


def test_granularity_keeps_active_width_and_expansion_sets_expert_count(tmp_path):
    runs = grid(tmp_path, model={"top_k": 1, "n_shared": 1},
                grid={"granularity": [1, 2, 4], "expansion": [2, 8]})
    assert len(runs) == 6
    for r in runs:
        g, e = r.axes["granularity"], r.axes["expansion"]
        m = r.model
        assert m.d_expert == 256 // g and m.top_k == g and m.n_experts == e * g
        assert m.granularity == g and m.expansion == e
        assert m.d_shared == 256                       # shared expert keeps the coarse width
        assert m.d_active_ffn == 256 + 256             # top_k * d_expert + shared: fixed in G


def test_shared_fraction_takes_part_of_the_active_width_instead_of_adding_to_it(tmp_path):
    """With ``shared_fraction: 1/2`` a shared expert holds half the routed active width and top_k
    halves (MobileMoE-L's layout), so every layout, with or without it, has the same active FFN
    width as the dense model (d_ff = 256): the shared expert is compared at equal compute."""
    runs = grid(tmp_path, model={"top_k": 1, "shared_fraction": 0.5},
                grid={"granularity": [2, 4, 8], "expansion": [4], "n_shared": [0, 1]})
    assert len(runs) == 6
    for r in runs:
        g, m = r.axes["granularity"], r.model
        assert m.d_active_ffn == 256 and m.d_expert == 256 // g
        assert (m.top_k, m.n_shared, m.d_shared) == ((g // 2, 1, 128) if m.n_shared else (g, 0, m.d_shared))
    with pytest.raises(ConfigError, match=r"top_k = 0.5"):          # G = 1, top-1: half an expert
        grid(tmp_path, model={"top_k": 1, "n_shared": 1, "shared_fraction": 0.5}, grid={"granularity": [1]})
    with pytest.raises(ConfigError, match=r"shared_fraction = 1.5: must be a number in \(0, 1\)"):
        grid(tmp_path, model={"top_k": 1, "n_shared": 1, "shared_fraction": 1.5}, grid={"granularity": [2]})


def test_granularity_without_expansion_keeps_n_experts_literal(tmp_path):
    (r,) = grid(tmp_path, model={"n_experts": 8, "top_k": 2}, grid={"granularity": [4]})
    assert (r.model.n_experts, r.model.top_k, r.model.d_expert) == (8, 8, 64)


def test_section_prefixed_axes_and_seeds(tmp_path):
    runs = grid(tmp_path, grid={"train.lr": [1e-3], "model.n_experts": [2, 4]}, seeds=[0, 1])
    assert [(r.model.n_experts, r.train.seed) for r in runs] == [(2, 0), (2, 1), (4, 0), (4, 1)]


def test_identical_points_are_one_run(tmp_path):
    runs = grid(tmp_path, model={"n_experts": 4}, grid={"granularity": [1], "d_ff": [256]})
    assert len(runs) == 1


def test_exclude_drops_points_that_would_not_validate(tmp_path):
    runs = grid(tmp_path, grid={"n_experts": [2, 4], "top_k": [1, 2, 4]},
                exclude=["top_k > n_experts", "granularity > 1 or (sparsity < 0.5 and top_k == 2)"])
    assert sorted((r.model.n_experts, r.model.top_k) for r in runs) == [(2, 1), (4, 1), (4, 2), (4, 4)]
    # the sparsity of (4, 4) is 0 but top_k != 2, (2, 2) was dropped by the first expression


@pytest.mark.parametrize("expr, value", [
    ("1 + 2 * 3 == 7", True), ("-(2 ** 3) < -7", True), ("7 // 2 == 3 and 7 % 2 == 1", True),
    ("not (1 < 2 < 3)", False), ("router == 'softmax'", True), ("max_tokens == None", True),
    ("0 or 5", 5)])
def test_exclude_interpreter(expr, value):
    env = {"router": "softmax", "max_tokens": None}
    assert compile_exclude(expr)(env) == value


@pytest.mark.parametrize("expr, problem", [
    ("__import__('os').system('true')", "function call"),
    ("n_experts.real > 1", "attribute access"),
    ("d_model[0] > 1", "subscript"),
    ("(lambda: 1) == 1", "lambda"),
    ("[x for x in d_model]", "ListComp"),
    ("n_experts if top_k else 1", "IfExp"),
    ("(top_k := 3) > 1", "NamedExpr"),
])
def test_unsafe_exclude_is_rejected(expr, problem):
    with pytest.raises(ConfigError, match="unsafe expression") as err:
        compile_exclude(expr)
    assert problem in str(err.value)


def test_exclude_names_and_runtime_errors_are_reported():
    with pytest.raises(ConfigError, match="unknown name 'n_expert'.*did you mean 'n_experts'"):
        compile_exclude("n_expert > 2")
    with pytest.raises(ConfigError, match="exponent"):
        compile_exclude("2 ** 100000 > d_model")({"d_model": 1})
    with pytest.raises(ConfigError, match="run 3.*division by zero"):
        compile_exclude("d_model / 0 > 1")({"d_model": 1}, "run 3")


@pytest.mark.parametrize("sections, pattern", [
    ({"grid": {"n_expert": [2]}}, r"grid\.n_expert: unknown field; did you mean 'n_experts'"),
    ({"model": {"d_modle": 64}}, r"model\.d_modle: unknown field; did you mean 'd_model'"),
    ({"grid": {"n_experts": [2, 4], "top_k": [3]}},
     r"run 0 \(n_experts=2, top_k=3\): model\.top_k = 3: must be <= n_experts \(2\)"),
    ({"grid": {"lr": [0.001, -1.0]}}, r"run 1 \(lr=-1\.0\): train\.lr = -1\.0: must be > 0"),
    ({"grid": {"granularity": [3]}}, r"run 0 \(granularity=3\): granularity = 3: must divide d_ff \(256\)"),
    ({"model": {"n_experts": 4}, "grid": {"expansion": [2]}}, r"expansion = 2: given together with n_experts"),
    ({"grid": {"granularity": [2], "expansion": [0.25]}}, r"not a whole number of experts"),
    ({"zip": {"d_model": [32, 64], "n_layers": [1]}}, r"zip: lists must have equal lengths"),
    ({"grid": {"n_experts": []}}, r"grid\.n_experts = \[\]: must be a non-empty list"),
    ({"grid": {"n_experts": [2]}, "zip": {"n_experts": [4]}}, r"zip\.n_experts: axis given twice"),
    ({"seeds": [0, -1]}, r"seeds = \[0, -1\]: must be a non-empty list of whole numbers"),
    ({"exclude": ["d_model > 1", "open('x')"]}, r"exclude\[1\] = \"open\('x'\)\": unsafe expression"),
    ({"exclude": ["d_model > 0"]}, r"no runs left after exclude"),
    ({"data": {"corpus": "missing/*.txt"}}, r"run 0: data\.corpus = 'missing/\*\.txt': matches no file"),
    ({"extra": 1}, r"unknown key 'extra'"),
])
def test_bad_grids_name_the_run_field_and_value(tmp_path, sections, pattern):
    with pytest.raises(ConfigError, match=pattern) as err:
        grid(tmp_path, **sections)
    assert "\n" not in str(err.value)


def test_malformed_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_grid(write(tmp_path, "name: x\ngrid: {n_experts: [2, 4}\n"))
    with pytest.raises(ConfigError, match="expected a mapping at the top level"):
        load_grid(write(tmp_path, "- a\n- b\n"))
    with pytest.raises(ConfigError, match="no such grid file"):
        load_grid(tmp_path / "nope.yaml")


def test_relative_corpus_paths_resolve_against_the_grid_folder(tmp_path):
    (tmp_path / "corpus.txt").write_text("hello")
    (run,) = grid(tmp_path, data={"corpus": "corpus.txt"})
    assert run.data.corpus == "corpus.txt"                      # the id hashes it as written
    assert resolve_corpus(run.data.corpus, tmp_path) == str(tmp_path / "corpus.txt")
    assert resolve_corpus("stdlib", tmp_path) == "stdlib"


def test_shipped_grids_validate():
    root = Path(__file__).resolve().parents[1] / "sweeps"
    quick = expand_grid(load_grid(root / "quickstart.yaml"))
    assert len(quick) >= 8 and all(r.data.corpus == "stdlib" for r in quick)
    varied = {name: {getattr(r.model, name) for r in quick}
              for name in ("n_experts", "top_k", "granularity", "n_shared")}
    assert all(len(values) > 1 for values in varied.values()), varied
    study = load_grid(root / "sparsity_granularity.yaml")
    runs = expand_grid(study)                       # its corpus: ../shared/data/text/gutenberg
    assert len(runs) >= 40
    assert {r.model.expansion for r in runs} >= {1, 2, 4, 8, 16}
    assert {r.model.granularity for r in runs} >= {1, 2, 4, 8}
    assert {r.model.n_shared for r in runs} == {0, 1}
    assert len({(r.model.d_model, r.model.n_layers) for r in runs}) >= 3


def test_layout_study_grid_compares_layouts_at_equal_compute_with_500_steps_or_more():
    """sweeps/layout_isoflop.yaml (issue 23): 360 runs; every MoE run's active FFN width equals its
    dense model's d_ff (equal active compute, the shared expert included), G in {1, 2, 4, 8} at E 4 and
    16, the shared expert at E4 with G 2-8, 3 budgets x 6 sizes, every run at least 500 steps, and 3
    seeds on the smallest budget only."""
    runs = expand_grid(load_grid(Path(__file__).resolve().parents[1] / "sweeps" / "layout_isoflop.yaml"))
    assert len(runs) == 360
    for r in runs:
        m = r.model
        assert m.d_active_ffn == 4 * m.d_model, (r.run_id, m.d_active_ffn)
        assert r.train.steps(r.data.seq_len) >= 500
    moe = [r.model for r in runs if r.model.is_moe]
    assert {(m.expansion, m.granularity) for m in moe if not m.n_shared} == {
        (e, g) for e in (4, 16) for g in (1, 2, 4, 8)}
    assert {(m.expansion, m.granularity) for m in moe if m.n_shared} == {(4, 2), (4, 4), (4, 8)}
    assert len({(r.model.d_model, r.train.tokens) for r in runs}) == 18
    seeds = {r.train.seed for r in runs if r.train.tokens == 24013824}
    assert seeds == {0} and {r.train.seed for r in runs if r.train.tokens == 8455168} == {0, 1, 2}
    assert {r.train.seed for r in runs if r.model.d_model == 16} == {0, 1, 2}


@pytest.mark.parametrize("expr, message", [
    ("2**2**2**2**2**2 > d_model", "exponent 65536 above 64"),
    ("9**9**9 > d_model", "exponent 387420489 above 64"),
    ("(d_model ** 60) ** 60 > 1", "a whole number above 1024 bits"),
    ("d_model ** 64 * d_model ** 64 * d_model ** 64 > 1", "a whole number above 1024 bits"),
    ("'a' * 10**9 == ''", "a string longer than 10000 characters"),
    ("'ab' * n_experts * 10**8 == ''", "a string longer than 10000 characters"),
    ("10**8 * 'ab' * n_experts == ''", "a string longer than 10000 characters"),
    ("'%0999999999d' % d_model == ''", "% string formatting is not allowed"),
    ("router > 1", "not supported between instances"),
])
def test_hostile_exclude_values_are_bounded(expr, message):
    fn = compile_exclude(expr, where="exclude[0]")
    with pytest.raises(ConfigError) as err:
        fn({"d_model": 64, "n_experts": 8, "router": "softmax"}, "run 0")
    text = str(err.value)
    assert "\n" not in text and text.startswith("run 0: exclude[0] = ") and message in text
    assert text.endswith("fix the expression")


@pytest.mark.parametrize("expr, message", [
    ("0x" + "f" * 400 + " > d_model", "a whole number above 1024 bits"),
    ("1" * 900 + " > d_model", "a whole number above 1024 bits"),
    ("-" * 10_000 + "d_model", "longer than 1000 characters"),
    ("-" * 900 + "d_model", "nested too deeply"),
    ("(" * 400 + "d_model" + ")" * 400, "not a valid expression (too many nested parentheses)"),
    ("+".join(["d_model"] * 120), "nested too deeply (at most 100 levels)"),
    ("d_model << 100000", "unsafe expression (LShift not allowed)"),
    ("d_model & 1", "unsafe expression (BitAnd not allowed)"),
    ("'" + "a" * 10_001 + "' == ''", "longer than 1000 characters"),
])
def test_hostile_exclude_syntax_is_rejected_at_load(expr, message):
    with pytest.raises(ConfigError) as err:
        compile_exclude(expr, where="exclude[2]")
    text = str(err.value)
    assert "\n" not in text and text.startswith("exclude[2] = ") and message in text
    assert len(text) < 300                                  # the expression is shown shortened


_NAMES = ["n_experts", "d_model", "lr", "router", "max_tokens"]
_ENV = {"n_experts": 8, "d_model": 64, "lr": 0.003, "router": "softmax", "max_tokens": None}


def _expressions():
    from hypothesis import strategies as st

    leaves = st.one_of(
        st.sampled_from(_NAMES),
        st.integers(min_value=-(2 ** 70), max_value=2 ** 70).map(str),
        st.sampled_from(["0", "1", "2", "9", "64", "10**8", "1e308", "0.5", "-1.5", "True", "None",
                         "'a'", "'ab'", "''"]),
    )

    def grow(children):
        binop = st.tuples(children, st.sampled_from(["+", "-", "*", "/", "//", "%", "**"]), children)
        compare = st.tuples(children, st.sampled_from(["<", "<=", "==", "!=", ">", ">="]), children)
        boolop = st.tuples(children, st.sampled_from(["and", "or"]), children)
        return st.one_of(
            binop.map(lambda t: f"({t[0]} {t[1]} {t[2]})"),
            compare.map(lambda t: f"({t[0]} {t[1]} {t[2]})"),
            boolop.map(lambda t: f"({t[0]} {t[1]} {t[2]})"),
            st.tuples(st.sampled_from(["-", "+", "not "]), children).map(lambda t: f"({t[0]}{t[1]})"),
        )

    return st.recursive(leaves, grow, max_leaves=12)


def test_random_exclude_expressions_give_a_value_or_a_config_error():
    """Whatever a small expression tree computes, only a value or a one-line ConfigError comes
    out, quickly (hypothesis' deadline fails a slow example)."""
    from hypothesis import given, settings

    @settings(max_examples=300, deadline=500)
    @given(_expressions())
    def check(expr):
        try:
            fn = compile_exclude(expr)
        except ConfigError as err:
            assert "\n" not in str(err)
            return
        try:
            fn(_ENV)
        except ConfigError as err:
            assert "\n" not in str(err)

    check()


def test_only_keeps_a_subset_with_the_whole_grids_numbering(tmp_path):
    """``--only`` selects runs after validation: the kept runs are exactly the whole grid's runs
    for which the expression holds, with the same ids, indices and labels, in the same order."""
    spec = load_grid(write(tmp_path, ISSUE_EXAMPLE))
    whole = expand_grid(spec)
    some = expand_grid(spec, only="d_model == 128 and n_shared == 1")
    expected = [r for r in whole if r.model.d_model == 128 and r.model.n_shared == 1]
    assert 0 < len(some) < len(whole)
    assert [(r.run_id, r.index, r.label) for r in some] == [(r.run_id, r.index, r.label) for r in expected]
    # train_compute = 3 x forward FLOPs per token x tokens (the isoFLOP budgets' count)
    from moe_scaling.costs import flops_per_token
    small = expand_grid(spec, only="train_compute < 9e11")
    computes = {r.run_id: 3 * flops_per_token(r.model, r.data.seq_len) * r.train.tokens for r in whole}
    assert 0 < len(small) < len(whole)
    assert {r.run_id for r in small} == {k for k, c in computes.items() if c < 9e11}
    with pytest.raises(ConfigError, match=r"--only = 'd_model == 7': matches no run of .*grid\.yaml"):
        expand_grid(spec, only="d_model == 7")
    with pytest.raises(ConfigError, match=r"--only = .*unsafe expression \(function call not allowed\)"):
        expand_grid(spec, only="open('x')")
