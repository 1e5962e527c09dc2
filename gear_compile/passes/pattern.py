"""Declared patterns over Dynamo's torch-level FX graph: a form is written as
the code it matches, and `match` reads it against a node.

    qk = Call(torch.matmul, Capture("query"), Call("transpose", Capture("key"), check=last_two))
    scaled = Maybe(Call(operator.mul, qk, Capture("factor", check=number)))

`scaled` matches `torch.matmul(q, k.transpose(2, 3)) * 0.125`, and the bare
product, as Dynamo records them (functions as call_function, tensor methods
by name as call_method). The pieces:

  Call(targets, *args, check=, name=)  a call to one of `targets` (functions,
        or method names) whose first positional arguments match `args`:
        patterns, literals (compared by ==) or lists of them; `name` binds the node
  Capture(name, inner=None, check=)    any value (or what `inner` matches),
        bound to `name`; a name bound twice must be the same value both times
  Either(*patterns)                    the first of them that matches
  Maybe(call)                          call, or else call's first argument alone
        (an optional one-node wrapper; a deeper one is an Either)
  Through(targets, inner, check=)      calls to `targets` along their first
        argument, as many as there are, then `inner`

A `check` is a validity test of the node (or value): None when valid, else
the reason it is not. A match is a dict of what was bound, with `nodes`: the
calls passed, in the order read (a node, then its arguments left to right).
A failed one is a `Miss` (false) whose reason is the first failed check's,
else the last mismatch, so a near miss says why.

Not torch.fx's SubgraphMatcher: it compares argument counts, keyword names
and literals exactly, has no optional piece (each would double the patterns)
and drops a match whose intermediates are read outside it, which the
matcher must report instead. Neighbour: `passes.match` (the attention
forms, declared in these).
"""
from __future__ import annotations

import torch.fx as fx


def example_value(node):
    """What an FX node of a Dynamo graph stands for: the fake tensor (or
    SymInt, or list of them) Dynamo recorded as its example value, or AOT's
    `val`; None for a non-node argument (a literal)."""
    return node.meta.get("example_value", node.meta.get("val")) if isinstance(node, fx.Node) else None


def is_call(node, *targets) -> bool:
    """node calls one of `targets` (functions, or method names as strings)."""
    return isinstance(node, fx.Node) and node.op in ("call_function", "call_method") and node.target in targets


class Miss:
    def __init__(self, reason):
        self._reason = reason

    @property
    def reason(self) -> str:
        return self._reason() if callable(self._reason) else self._reason

    def __bool__(self):
        return False

    def __repr__(self):
        return f"Miss({self.reason!r})"


class Match(dict):
    def __init__(self, bound: dict):
        super().__init__(bound)
        self.nodes: list[fx.Node] = []
        self.miss, self.checked = "", False

    def __bool__(self):
        return True

    def fail(self, reason, checked: bool = False) -> bool:
        """reason: a check's, or a mismatch's as a function (built when read)."""
        if not self.checked:
            self.miss, self.checked = reason, checked
        return False


def match(pattern, node, **bound) -> Match | Miss:
    """`pattern` read at `node`, with names already `bound`: a Match, or a Miss."""
    if isinstance(pattern, Call) and not is_call(node, *pattern.targets):     # most nodes: said at once
        return Miss(_not_a_call(node, pattern.targets))
    m = Match(bound)
    return m if _match(pattern, node, m) else Miss(m.miss)


def _match(pattern, x, m: Match) -> bool:
    if isinstance(pattern, Pattern):
        return pattern.match(x, m)
    if isinstance(pattern, (list, tuple)):
        if not isinstance(x, (list, tuple)) or len(x) != len(pattern):
            return m.fail(lambda: f"{x} is not a sequence of {len(pattern)}")
        return all(_match(p, y, m) for p, y in zip(pattern, x))
    return x == pattern or m.fail(lambda: f"{x} is not {pattern}")


def _not_a_call(x, targets):
    names = (t if isinstance(t, str) else getattr(t, "__name__", str(t)) for t in targets)
    return lambda: f"{getattr(x, 'name', x)} is not a call to {' / '.join(names)}"


class Pattern:
    def match(self, x, m: Match) -> bool:
        raise NotImplementedError


class Call(Pattern):
    def __init__(self, targets, *args, check=None, name: str | None = None):
        self.targets = targets if isinstance(targets, tuple) else (targets,)
        self.args, self.check, self.name = args, check, name

    def match(self, x, m):
        if not is_call(x, *self.targets):
            return m.fail(_not_a_call(x, self.targets))
        if self.check and (reason := self.check(x)):
            return m.fail(f"{x.name}: {reason}", checked=True)
        m.nodes.append(x)
        if self.name and not Capture(self.name).match(x, m):
            return False
        if len(x.args) < len(self.args):
            return m.fail(lambda: f"{x.name} has fewer than {len(self.args)} arguments")
        return all(_match(p, a, m) for p, a in zip(self.args, x.args))


class Capture(Pattern):
    def __init__(self, name: str, inner=None, check=None):
        self.name, self.inner, self.check = name, inner, check

    def match(self, x, m):
        if self.check and (reason := self.check(x)):
            return m.fail(f"{self.name}: {reason}", checked=True)
        if self.name in m and not (m[self.name] is x or m[self.name] == x):
            return m.fail(f"{self.name} is {getattr(x, 'name', x)} here but {m[self.name]} before")
        m[self.name] = x
        return self.inner is None or _match(self.inner, x, m)


class Either(Pattern):
    def __init__(self, *alternatives):
        self.alternatives = alternatives

    def match(self, x, m):
        for pattern in self.alternatives:
            bound, read = dict(m), len(m.nodes)
            if _match(pattern, x, m):
                return True
            m.clear()
            m.update(bound)
            del m.nodes[read:]
        return False


class Maybe(Either):
    def __init__(self, call: Call):
        super().__init__(call, call.args[0])


class Through(Pattern):
    def __init__(self, targets: tuple, inner, check=None):
        self.targets, self.inner, self.check = targets, inner, check

    def match(self, x, m):
        while is_call(x, *self.targets):
            if self.check and (reason := self.check(x)):
                m.fail(f"{x.name}: {reason}", checked=True)
                break
            m.nodes.append(x)
            x = x.args[0]
        return _match(self.inner, x, m)
