"""What an answer may not use, and the two places that enforce it.

Each exercise builds something that PyTorch or training.py already has; calling that instead
is not an answer. BANNED lists those names per exercise (plus what every exercise bans: the
checker itself, the solutions, code built from strings). They are enforced twice:

* `scan(slug, sources)`, in the grader process, reads the answer cells' source: it resolves
  imports and aliases (`from training import cross_entropy as ce`, `import torch.special as s`),
  so a banned name is found wherever it is used, also at module level before the answer, and it
  refuses patching a module (`training.linear_lr = ...`, `json.dumps = ...`), exec/eval, and
  paths into solutions/ or notebooks.
* `CallGuard(slug)`, in the kernel while the candidate runs, catches a banned function when it
  is actually called, also from code the scan cannot see (a helper in another module).
"""
from __future__ import annotations

import ast
import importlib
import inspect
import os
import re
import sys
import types

import torch

# Names (module, function, class or tensor method ".name") each exercise may not use.
BANNED = {
    "cross-entropy": ["torch.nn.functional.cross_entropy", "torch.nn.functional.nll_loss",
                      "torch.nn.functional.log_softmax", "torch.log_softmax", "torch.logsumexp",
                      "torch.special", "torch.nn.CrossEntropyLoss", "torch.nn.NLLLoss", "torch.nn.LogSoftmax",
                      "training.cross_entropy", "m07_training.loss", ".log_softmax", ".logsumexp"],
    "adamw": ["torch.optim.AdamW", "torch.optim.Adam", "torch.optim.adamw", "torch.optim.adam",
              "torch._fused_adamw_", "torch._fused_adam_", "training.AdamW", "training.MuonWithAdamW",
              "m07_training.optimizers", "m07_training.muon", "._step_loop", "._adamw_group"],
    "clip-grad-norm": ["torch.nn.utils.clip_grad_norm_", "torch.nn.utils.clip_grad_norm",
                       "torch.nn.utils.get_total_norm", "torch.nn.utils.clip_grad", "training.clip_grad_norm",
                       "m07_training.clipping"],
    "cosine-schedule": ["training.cosine_lr", "training.CosineScheduler", "m07_training.schedules",
                        "torch.optim.lr_scheduler"],
    "linear-schedule": ["training.linear_lr", "m07_training.schedules", "torch.optim.lr_scheduler"],
    "lr-finder": [],
    "early-stopping": [],
    "label-smoothing": ["torch.nn.functional.cross_entropy", "torch.nn.functional.nll_loss",
                        "torch.nn.CrossEntropyLoss", "torch.nn.NLLLoss", "training.cross_entropy",
                        "m07_training.loss"],
    "grad-accumulation": ["training.train", "m07_training.loop"],
    "loss-scaler": ["torch.amp.GradScaler", "torch.amp.grad_scaler", "torch.cuda.amp.GradScaler",
                    "torch.cpu.amp.GradScaler", "torch._amp_foreach_non_finite_check_and_unscale_",
                    "torch._amp_update_scale_"],
    "resume": ["training.save_checkpoint", "training.load_checkpoint", "training.read_checkpoint",
               "m07_training.checkpoint"],
    "muon": ["torch.optim.Muon", "torch.optim._muon", "training.Muon", "training.MuonWithAdamW",
             "training.newton_schulz", "m07_training.muon"],
}
# The checker and the solutions are off limits in every exercise (importing the checks and calling a
# `check_*` is allowed).
COMMON = ["exercises.grade", "exercises.integrity", "exercises.checks"]
ALLOWED_FROM_CHECKS = re.compile(r"exercises\.checks\.(check_\w+|ExerciseFailed)$")
CODE_FROM_STRINGS = {"exec", "eval", "compile", "__import__", "importlib", "runpy", "imp"}
# Modules whose attributes an answer may not reassign: the checker, the references, and what the
# time limit and the reporting rely on (the grade never depends on them, but a patch is a clear
# sign of an attempt to fool the check).
NO_PATCHING = ("exercises", "training", "m07_training", "json", "builtins", "sys", "torch", "threading", "signal", "os")
PATCHING_ALLOWED = ("torch.backends", "os.environ")
SUSPICIOUS_PATH = re.compile(r"solutions[/\\]|\.ipynb\b")


class Refused(BaseException):
    """A banned function was called. A BaseException, so that `except Exception` in the answer does not
    swallow it; the guard also remembers it, for a bare `except:`."""


def _banned(slug, dotted):
    for name in BANNED[slug] + COMMON:
        if name.startswith("."):
            if dotted.endswith(name):
                return name[1:]
        elif (dotted == name or dotted.startswith(name + ".")) and not ALLOWED_FROM_CHECKS.match(dotted) \
                and dotted != "exercises.checks":
            return name
    return None


class _Scanner(ast.NodeVisitor):
    def __init__(self, slug):
        self.slug, self.aliases, self.problems = slug, {}, []

    def dotted(self, node):
        """'torch.nn.functional.cross_entropy' for F.cross_entropy, via the aliases; None if not a name chain."""
        parts = []
        while isinstance(node, ast.Attribute):
            parts.append(node.attr)
            node = node.value
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr" \
                and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant):
            inner = self.dotted(node.args[0])
            return ".".join([inner, str(node.args[1].value)] + parts[::-1]) if inner else None
        if not isinstance(node, ast.Name):
            return "?." + ".".join(parts[::-1]) if parts else None
        root = self.aliases.get(node.id, node.id)
        return ".".join([root] + parts[::-1])

    def flag(self, text):
        if text not in self.problems:
            self.problems.append(text)

    def use(self, dotted):
        name = dotted and _banned(self.slug, dotted)
        if name:
            self.flag(f"`{dotted}`" if dotted.rsplit(".", 1)[-1] == name.rsplit(".", 1)[-1]
                      else f"`{dotted}` ({name})")

    def visit_Import(self, node):
        for alias in node.names:
            self.aliases[alias.asname or alias.name.split(".")[0]] = alias.name if alias.asname else \
                alias.name.split(".")[0]
            self.use(alias.name)
            if alias.name.split(".")[0] in CODE_FROM_STRINGS:
                self.flag(f"`import {alias.name}` (code loaded by name)")

    def visit_ImportFrom(self, node):
        module = "." * node.level + (node.module or "")
        if module.split(".")[0] in CODE_FROM_STRINGS:
            self.flag(f"`from {module} import ...` (code loaded by name)")
        for alias in node.names:
            self.aliases[alias.asname or alias.name] = f"{module}.{alias.name}"
            self.use(f"{module}.{alias.name}")

    def visit_Attribute(self, node):
        self.use(self.dotted(node))  # the whole chain, once: not again for torch.special in torch.special.x
        root = node
        while isinstance(root, ast.Attribute):
            root = root.value
        if isinstance(root, ast.Name):
            self.name_rules(root.id)
        else:
            self.visit(root)

    def visit_Name(self, node):
        self.name_rules(node.id)
        self.use(self.aliases.get(node.id))

    def name_rules(self, name):
        if name in CODE_FROM_STRINGS:
            self.flag(f"`{name}` (code built from a string)")
        if name.startswith("_grader") or name in ("vars", "globals"):
            self.flag(f"`{name}` (the grader's own names, or namespaces by name)")

    def visit_Call(self, node):
        if isinstance(node.func, ast.Name) and node.func.id in ("setattr", "delattr") and node.args:
            self.patch(node.args[0], f"{node.func.id}(...)")
        if isinstance(node.func, ast.Name) and node.func.id == "getattr":
            self.use(self.dotted(node))
        self.generic_visit(node)

    def patch(self, target, how):
        dotted = self.dotted(target)
        if dotted and dotted.split(".")[0] in NO_PATCHING and not dotted.startswith(PATCHING_ALLOWED):
            self.flag(f"a change to the module `{dotted}` ({how})")

    def visit_Assign(self, node):
        for target in node.targets:
            if isinstance(target, ast.Attribute):
                self.patch(target, "assignment")
            elif isinstance(target, ast.Subscript):  # sys.modules["training"] = ..., vars(json)["dumps"] = ...
                self.patch(target.value, "item assignment")
        self.generic_visit(node)

    def visit_AugAssign(self, node):
        if isinstance(node.target, ast.Attribute):
            self.patch(node.target, "assignment")
        self.generic_visit(node)

    visit_AnnAssign = visit_AugAssign

    def visit_Delete(self, node):
        for target in node.targets:
            if isinstance(target, ast.Attribute):
                self.patch(target, "del")
        self.generic_visit(node)

    def visit_Expr(self, node):
        if not (isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)):  # not a docstring
            self.generic_visit(node)

    def visit_Constant(self, node):
        if isinstance(node.value, str) and SUSPICIOUS_PATH.search(node.value):
            self.flag(f"the path {node.value!r} (the solutions, notebooks and reference answers are off limits)")


def scan(slug, sources):
    """Why the answer cells `sources` are refused for exercise `slug`, or None. Cells that do not parse
    are skipped (running them reports the syntax error)."""
    scanner = _Scanner(slug)
    for source in sources:
        try:
            tree = ast.parse(_strip_magics(source))
        except SyntaxError:
            continue
        scanner.visit(tree)
    if not scanner.problems:
        return None
    return ("refused: the answer uses " + "; ".join(scanner.problems) + ". This exercise asks you to write "
            "the computation yourself, without the functions it rebuilds, the checker, the solutions, or "
            "changes to modules")


def _strip_magics(source):
    """Notebook lines starting with % or ! are IPython commands, not Python."""
    return "\n".join("" if line.lstrip().startswith(("%", "!")) else line for line in source.splitlines())


# ----------------------------------------------------------------------------------------
# The same list, enforced while the candidate runs
# ----------------------------------------------------------------------------------------

def _resolve(dotted):
    """The object a dotted name names (importing modules on the way), or None."""
    parts = dotted.split(".")
    try:
        value = importlib.import_module(parts[0])
    except ImportError:
        return None
    for index, part in enumerate(parts[1:], start=2):
        value = getattr(value, part, None)
        if value is None:  # a submodule not imported yet
            try:
                value = importlib.import_module(".".join(parts[:index]))
            except ImportError:
                return None
    return value


def _codes_of(value):
    """The code objects of a Python function, or of every function a class defines."""
    if isinstance(value, type):
        found = set()
        for attribute in vars(value).values():
            found |= _codes_of(getattr(attribute, "__func__", attribute))
        return found
    value = inspect.unwrap(value) if callable(value) else value
    code = getattr(value, "__code__", None)
    return {code} if code is not None else set()


def _defined_for(builtin, module):
    """Whether a builtin function in `module`'s namespace is the module's own (its C implementation, as
    torch.special's in torch._C._special) rather than one it imported from elsewhere (bisect_right in
    torch.optim.lr_scheduler): only its own are banned with it."""
    home = getattr(builtin, "__module__", None) or ""
    return home == module.__name__ or home.startswith((module.__name__ + ".", "torch._C._"))


class CallGuard:
    """sys.setprofile hook that raises Refused when a banned function is called."""

    def __init__(self, slug):
        # what is banned -> the name to show: code objects, source files, builtin functions (by id)
        self.codes, self.files, self.builtins, self.tensor_methods = {}, {}, {}, set()
        self.refused = None
        for name in BANNED[slug]:
            if name.startswith("."):
                self.tensor_methods.add(name[1:])
                continue
            value = _resolve(name)
            if isinstance(value, types.ModuleType):
                if getattr(value, "__file__", None) and not value.__file__.endswith("__init__.py"):
                    self.files[os.path.realpath(value.__file__)] = name
                self.builtins.update({id(v): f"{name}.{k}" for k, v in vars(value).items()
                                      if isinstance(v, types.BuiltinFunctionType) and _defined_for(v, value)})
            elif isinstance(value, types.BuiltinFunctionType):
                self.builtins[id(value)] = name
            elif value is not None:
                self.codes.update(dict.fromkeys(_codes_of(value), name))

    def __call__(self, frame, event, arg):
        if event == "call":
            code = frame.f_code
            name = self.codes.get(code) or (self.files and self.files.get(os.path.realpath(code.co_filename)))
            if name:
                self.refuse(name)
        elif event == "c_call":
            name = self.builtins.get(id(arg))
            if name is None and arg.__name__ in self.tensor_methods \
                    and isinstance(getattr(arg, "__self__", None), torch.Tensor):
                name = f"Tensor.{arg.__name__}"
            if name:
                self.refuse(name)

    def refuse(self, name):
        self.refused = self.refused or (f"refused: your code called `{name}`, which this exercise asks you to "
                                        f"write yourself (directly or through another function)")
        raise Refused(self.refused)

    def __enter__(self):
        self.previous = sys.getprofile()
        sys.setprofile(self)
        return self

    def __exit__(self, *exc):
        sys.setprofile(self.previous)
        return False

