"""Grid ``exclude`` expressions: parsed with :mod:`ast` and interpreted here, never passed to ``eval``.

An expression sees every resolved field by its plain name (``n_experts``, ``top_k``, ``d_expert``,
``lr``, ``seq_len``, ``seed``, ...) plus ``granularity``, ``expansion``, ``sparsity``,
``activation_ratio`` and, for points that validate, ``train_compute`` (3 x forward FLOPs per token
at ``seq_len`` x ``tokens``: the compute a budget of the isoFLOP studies counts)
(:data:`EXCLUDE_NAMES`), and may use only names, numbers, strings,
``True``/``False``/``None``, comparisons, ``and``/``or``/``not`` and arithmetic
(``+ - * / // % **``). Anything else (calls, attributes, subscripts, lambdas, comprehensions,
shifts, bit operations, ...) is rejected as unsafe.

A grid file is input from anyone, so every resource an expression can consume is bounded before
it is spent: its length (:data:`MAX_CHARS`), its nesting depth (:data:`MAX_DEPTH`), every whole
number (:data:`MAX_BITS` bits, checked before a product or power is computed), every string
(:data:`MAX_STR` characters, checked before a repetition), exponents (:data:`MAX_POW`), and no
``%`` string formatting. Breaking a bound is a one-line :class:`ConfigError`, like any other bad
expression; an exclude never raises anything else and never exhausts memory.
"""

from __future__ import annotations

import ast
import difflib
import operator
from dataclasses import fields
from typing import Any, Callable, Mapping

from moe_scaling.config import DataConfig, ModelConfig, TrainConfig
from moe_scaling.errors import ConfigError

__all__ = ["compile_exclude", "EXCLUDE_NAMES", "DERIVED_PROPERTIES", "did_you_mean", "MAX_CHARS",
           "MAX_DEPTH", "MAX_BITS", "MAX_STR", "MAX_POW"]

DERIVED_PROPERTIES = ("granularity", "expansion", "sparsity", "activation_ratio")
EXCLUDE_NAMES = frozenset(f.name for cls in (ModelConfig, TrainConfig, DataConfig) for f in fields(cls)) \
    | frozenset(DERIVED_PROPERTIES) | {"train_compute"}

MAX_CHARS = 1000      # characters in one expression
MAX_DEPTH = 100       # nesting depth of its syntax tree
MAX_BITS = 1024       # bits of any whole number (a literal or an intermediate value)
MAX_STR = 10_000      # characters of any string (a literal or an intermediate value)
MAX_POW = 64          # largest exponent of ``**``

_BINOPS: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
}
_CMPOPS: dict[type, Callable[[Any, Any], bool]] = {
    ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
    ast.Gt: operator.gt, ast.GtE: operator.ge,
}
_UNARY: dict[type, Callable[[Any], Any]] = {ast.Not: operator.not_, ast.USub: operator.neg,
                                            ast.UAdd: operator.pos}
_ALLOWED = (ast.Expression, ast.BoolOp, ast.And, ast.Or, ast.UnaryOp, ast.BinOp, ast.Compare,
            ast.Name, ast.Load, ast.Constant, *_BINOPS, *_CMPOPS, *_UNARY)
_FIX = "use only field names, numbers, comparisons, and/or/not and arithmetic"


class _TooBig(ValueError):
    """An intermediate value would break a bound."""


def did_you_mean(key: Any, names) -> str:
    """``"; did you mean 'x'?"`` for the closest of ``names``, or ``""``."""
    close = difflib.get_close_matches(str(key), list(names), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _shown(expr: str) -> str:
    """``repr(expr)``, shortened to 80 characters so the error stays one readable line."""
    text = repr(expr)
    return text if len(text) <= 80 else text[:70] + "...' (" + f"{len(expr)} characters)"


def compile_exclude(expr: str, where: str = "exclude") -> Callable[..., Any]:
    """Parse ``expr`` and return ``fn(env, label="") -> value`` that interprets it over ``env``.

    Raises :class:`ConfigError` at parse time for a syntax error, a construct outside the allowed
    set (names, constants, comparisons, and/or/not, arithmetic), a name that is no known field, or
    an expression, literal or nesting depth over its bound; ``fn`` raises :class:`ConfigError` for
    a value that cannot be computed or would break a bound (see the module docstring).
    """
    shown = _shown(expr)
    if len(expr) > MAX_CHARS:
        raise ConfigError(f"{where} = {shown}: longer than {MAX_CHARS} characters; write a shorter "
                          "expression")
    try:
        tree = ast.parse(expr, mode="eval")
    except SyntaxError as err:
        raise ConfigError(f"{where} = {shown}: not a valid expression ({err.msg}); "
                          "write e.g. \"top_k > n_experts\"") from None
    except (RecursionError, MemoryError, ValueError):
        raise ConfigError(f"{where} = {shown}: nested too deeply (at most {MAX_DEPTH} levels); write a "
                          "flatter expression") from None
    _check_tree(tree, where, shown)

    def fn(env: Mapping[str, Any], label: str = "") -> Any:
        try:
            return _eval(tree.body, env)
        except (ArithmeticError, LookupError, TypeError, ValueError, RecursionError, MemoryError) as err:
            prefix = f"{label}: " if label else ""
            raise ConfigError(f"{prefix}{where} = {shown}: cannot be evaluated "
                              f"({_reason(err)}); fix the expression") from None
    return fn


def _reason(err: BaseException) -> str:
    """What went wrong, in a few words on one line."""
    if isinstance(err, LookupError):
        return f"no value for {err}"
    return " ".join(str(err).split())[:200] or type(err).__name__


def _check_tree(tree: ast.Expression, where: str, shown: str) -> None:
    """Depth, allowed constructs, known names and literal sizes, without recursion."""
    stack: list[tuple[ast.AST, int]] = [(tree, 0)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise ConfigError(f"{where} = {shown}: nested too deeply (at most {MAX_DEPTH} levels); write "
                              "a flatter expression")
        problem = _unsafe(node)
        if problem:
            raise ConfigError(f"{where} = {shown}: unsafe expression ({problem} not allowed); {_FIX}")
        if isinstance(node, ast.Name) and node.id not in EXCLUDE_NAMES:
            raise ConfigError(f"{where} = {shown}: unknown name {node.id!r}{did_you_mean(node.id, EXCLUDE_NAMES)}")
        if isinstance(node, ast.Constant):
            try:
                _bounded(node.value)
            except _TooBig as err:
                raise ConfigError(f"{where} = {shown}: {err}; use smaller numbers and strings") from None
        stack.extend((child, depth + 1) for child in ast.iter_child_nodes(node))


def _unsafe(node: ast.AST) -> str | None:
    if not isinstance(node, _ALLOWED):
        return {ast.Call: "function call", ast.Attribute: "attribute access", ast.Subscript: "subscript",
                ast.Lambda: "lambda"}.get(type(node), type(node).__name__)
    if isinstance(node, ast.Constant) and not isinstance(node.value, (int, float, str, bool, type(None))):
        return f"constant {node.value!r}"
    return None


def _bounded(value: Any) -> Any:
    """``value`` itself, or :class:`_TooBig` for a whole number or string over its bound."""
    if isinstance(value, int) and value.bit_length() > MAX_BITS:
        raise _TooBig(f"a whole number above {MAX_BITS} bits")
    if isinstance(value, str) and len(value) > MAX_STR:
        raise _TooBig(f"a string longer than {MAX_STR} characters")
    return value


def _binop(op: ast.operator, left: Any, right: Any) -> Any:
    """One arithmetic operation, refused before it runs when its result would break a bound."""
    if isinstance(op, ast.Pow):
        if isinstance(right, (int, float)) and abs(right) > MAX_POW:
            raise _TooBig(f"exponent {right} above {MAX_POW}")
        if isinstance(left, int) and isinstance(right, int) and right > 0 \
                and left.bit_length() * right > MAX_BITS:
            raise _TooBig(f"a whole number above {MAX_BITS} bits")
    elif isinstance(op, ast.Mult):
        if isinstance(left, int) and isinstance(right, int) and left.bit_length() + right.bit_length() > MAX_BITS:
            raise _TooBig(f"a whole number above {MAX_BITS} bits")
        text, times = (left, right) if isinstance(left, str) else (right, left)
        if isinstance(text, str) and isinstance(times, int) and len(text) * max(times, 0) > MAX_STR:
            raise _TooBig(f"a string longer than {MAX_STR} characters")
    elif isinstance(op, ast.Mod) and isinstance(left, str):
        raise TypeError("% string formatting is not allowed")
    return _bounded(_BINOPS[type(op)](left, right))


def _eval(node: ast.AST, env: Mapping[str, Any]) -> Any:
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name):
        return env[node.id]
    if isinstance(node, ast.BoolOp):
        if isinstance(node.op, ast.And):
            result: Any = True
            for v in node.values:
                result = _eval(v, env)
                if not result:
                    return result
            return result
        result = False
        for v in node.values:
            result = _eval(v, env)
            if result:
                return result
        return result
    if isinstance(node, ast.UnaryOp):
        return _UNARY[type(node.op)](_eval(node.operand, env))
    if isinstance(node, ast.BinOp):
        return _binop(node.op, _eval(node.left, env), _eval(node.right, env))
    if isinstance(node, ast.Compare):
        left = _eval(node.left, env)
        for op, comp in zip(node.ops, node.comparators):
            right = _eval(comp, env)
            if not _CMPOPS[type(op)](left, right):
                return False
            left = right
        return True
    raise ValueError(f"unsupported node {type(node).__name__}")  # unreachable after _check_tree
