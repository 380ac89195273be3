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
  is actually called, also from code the scan cannot see (a helper in another module); and, one
  level down, a TorchDispatchMode refuses the ATen operators behind those functions (BANNED_OPS)
  however they are reached: `torch.ops.aten._log_softmax`, a copied function, a fused kernel.
  The check's own reference computations never run under either: both are entered only around
  each call of the candidate.
"""
from __future__ import annotations

import ast
import importlib
import inspect
import os
import re
import sys
import threading
import types

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Names (module, function, class or tensor method ".name") each exercise may not use.
# PyTorch's own versions of what the loss, AdamW and clipping exercises rebuild; the capstone bans all three.
TORCH_LOSS = ["torch.nn.functional.cross_entropy", "torch.nn.functional.nll_loss", "torch.nn.functional.log_softmax",
              "torch.log_softmax", "torch.logsumexp", "torch.special", "torch.nn.CrossEntropyLoss", "torch.nn.NLLLoss",
              "torch.nn.LogSoftmax", ".log_softmax", ".logsumexp"]
TORCH_ADAMW = ["torch.optim.AdamW", "torch.optim.Adam", "torch.optim.adamw", "torch.optim.adam", "torch._fused_adamw_",
               "torch._fused_adam_"]
TORCH_CLIP = ["torch.nn.utils.clip_grad_norm_", "torch.nn.utils.clip_grad_norm", "torch.nn.utils.get_total_norm",
              "torch.nn.utils.clip_grad"]
BANNED = {
    "cross-entropy": TORCH_LOSS + ["training.cross_entropy", "m07_training.loss",
                                   # the backward is the learner's: no autograd of their own forward inside it
                                   "torch.autograd.grad", "torch.autograd.functional", "torch.func",
                                   "torch.enable_grad", "torch.set_grad_enabled"],
    "adamw": TORCH_ADAMW + ["training.AdamW", "training.MuonWithAdamW", "m07_training.optimizers", "m07_training.muon",
                            "._step_loop", "._adamw_group"],
    "clip-grad-norm": TORCH_CLIP + ["training.clip_grad_norm", "m07_training.clipping"],
    "cosine-schedule": ["training.cosine_lr", "training.lr_of_update", "training.CosineScheduler",
                        "m07_training.schedules", "torch.optim.lr_scheduler"],
    "wsd-schedule": ["training.wsd_lr", "m07_training.schedules", "torch.optim.lr_scheduler"],
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
    # the capstone: every piece the loop is made of is the learner's own (torch.optim.Optimizer stays allowed, as
    # the base class of the learner's AdamW)
    "training-loop": TORCH_LOSS + TORCH_ADAMW + TORCH_CLIP + [
        "torch.optim.SGD", "torch.optim.Muon", "torch.optim.sgd", "torch.optim._muon", "torch.optim.lr_scheduler",
        "training", "m07_training.loss", "m07_training.optimizers", "m07_training.muon", "m07_training.schedules",
        "m07_training.clipping", "m07_training.checkpoint", "m07_training.loop"],
    "muon": ["torch.optim.Muon", "torch.optim._muon", "training.Muon", "training.MuonWithAdamW",
             "training.newton_schulz", "m07_training.muon"],
    # DDP, FSDP and composable replicate average gradients themselves (the class or function first: the guard names
    # it rather than its file); lesson 7's torchrun helpers too
    "gradient-all-reduce": ["torch.nn.parallel.DistributedDataParallel", "torch.nn.parallel",
                            "torch.nn.parallel.distributed", "torch.distributed.fsdp.fully_shard",
                            "torch.distributed.fsdp.FullyShardedDataParallel", "torch.distributed.fsdp",
                            "torch.distributed._composable.replicate", "torch.distributed._composable",
                            "m07_training.distributed"],
}
# The ATen operators (by name, without the overload) behind each exercise's banned functions, refused by the
# dispatcher while the candidate runs. Cross-entropy's composite functions (F.cross_entropy, log_softmax,
# torch.special.*) reach these; torch.optim.Adam(W)'s fused kernels are these (their for-each and for-loop
# versions run Python of torch/optim/adam*.py, which CallGuard refuses by file). clip_grad_norm_ and
# get_total_norm are Python over ordinary norm operators, which an answer needs: CallGuard refuses them.
BANNED_OPS = {
    "cross-entropy": {"log_softmax", "_log_softmax", "special_log_softmax", "logsumexp", "special_logsumexp",
                      "nll_loss", "nll_loss_forward", "nll_loss2d", "nll_loss2d_forward", "nll_loss_nd",
                      "cross_entropy_loss"},
    "adamw": {"_fused_adamw", "_fused_adamw_", "_fused_adam", "_fused_adam_"},
}
BANNED_OPS["training-loop"] = BANNED_OPS["cross-entropy"] | BANNED_OPS["adamw"]
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
# Refused in every exercise, by (dotted name, why): what reaches into the interpreter, the kernel, the dispatcher,
# other processes or private code, none of which an answer needs.
RUNTIME = [(re.compile(pattern), why) for pattern, why in (
    (r"gc(\..*)?$", "the garbage collector, which hands out every object"),
    (r"sys\.(modules|_getframe|setprofile|settrace|_current_frames|meta_path|path_hooks)\b",
     "the interpreter's modules, frames or hooks"),
    (r"types\.(CodeType|FunctionType|LambdaType|MethodType)\b", "functions built from code objects"),
    (r"(subprocess|multiprocessing|torch\.multiprocessing|pty|ctypes|_ctypes|signal|_signal|threading|_thread|"
     r"concurrent|faulthandler|_posixsubprocess)(\..*)?$",
     "other processes, threads (outside the guard), signals or raw memory"),
    (r"os\.(system|popen|fork|forkpty|exec\w*|spawn\w*|posix_spawn\w*|kill|killpg|setsid|register_at_fork)$",
     "other processes"),
    (r"inspect\.(currentframe|stack|trace|getouterframes|getinnerframes)$", "the interpreter's frames"),
    (r"torch\.(_C|overrides|library|_ops|_dispatch|_python_dispatcher)(\..*)?$|torch\.utils\._python_dispatch",
     "torch's dispatcher"),
    (r"(training|m07_training|m06_transformer)(\.[A-Za-z]\w*)*\._\w*", "private helpers of the course code"),
    (r"IPython(\..*)?$|ipykernel(\..*)?$|get_ipython$", "the notebook's kernel"),
)]
# Attributes that reach a function's code, globals or an object's namespace, or the call stack.
RUNTIME_ATTRIBUTES = {"__dict__", "__code__", "__globals__", "__closure__", "__builtins__", "__subclasses__",
                      "__getattribute__", "__reduce__", "__reduce_ex__", "f_back", "f_globals", "f_locals",
                      "f_builtins", "f_code", "tb_frame", "gi_frame", "cr_frame", "ag_frame"}


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
        if dotted:
            for pattern, why in RUNTIME:
                if pattern.match(dotted):
                    self.flag(f"`{dotted}` ({why})")
            for attribute in dotted.split(".")[1:]:
                if attribute in RUNTIME_ATTRIBUTES:
                    self.flag(f"`{dotted}` (`{attribute}` reaches code, namespaces or frames)")
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
        if name.startswith("_grader") or name in ("vars", "globals", "__builtins__"):
            self.flag(f"`{name}` (the grader's own names, or namespaces by name)")
        if name == "get_ipython":
            self.flag("`get_ipython` (the notebook's kernel)")

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
        if isinstance(node.value, str) and (node.value in RUNTIME_ATTRIBUTES or node.value.startswith("_grader")):
            self.flag(f"the name {node.value!r} (code, namespaces, frames or the grader's own names)")
        if isinstance(node.value, str) and SUSPICIOUS_PATH.search(node.value):
            self.flag(f"the path {node.value!r} (the solutions, notebooks and reference answers are off limits)")


def scan(slug, sources):
    """Why the answer cells `sources` are refused for exercise `slug`, or None. Cells that do not parse
    are skipped (running them reports the syntax error)."""
    scanner = _Scanner(slug)
    for source in sources:
        for line in source.splitlines():
            if line.lstrip().startswith(("%", "!")):
                scanner.flag(f"the IPython command `{line.strip()[:40]}` (magics and shell commands run code the "
                             f"reading cannot see)")
        try:
            tree = ast.parse(_strip_magics(source))
        except SyntaxError:
            continue
        scanner.visit(tree)
    if not scanner.problems:
        return None
    return ("refused: the answer uses " + "; ".join(scanner.problems) + ". This exercise asks you to write "
            "the computation yourself, without the functions it rebuilds, the checker, the solutions, "
            "changes to modules, or reaching into the interpreter, the kernel or other processes")


def _strip_magics(source):
    """Notebook lines starting with % or ! are IPython commands, not Python (scan refuses them; the rest of the
    cell is still read)."""
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


class _OpGuard(TorchDispatchMode):
    """Refuses the exercise's BANNED_OPS when the dispatcher runs them."""

    def __init__(self, ops, guard):
        super().__init__()
        self.ops, self.guard = ops, guard

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::")[-1]
        if name in self.ops:
            self.guard.refuse(f"torch.ops.aten.{name}")
        return func(*args, **(kwargs or {}))


class CallGuard:
    """sys.setprofile hook that raises Refused when a banned function is called; with it, a dispatch mode that
    refuses the exercise's banned ATen operators. Both also hold in every thread that the `threading` module
    starts while the guard is on (library code's threads: asyncio.to_thread, thread pools), for that thread's
    life."""

    def __init__(self, slug):
        self.ops = BANNED_OPS.get(slug, set())
        if self.ops:  # the first dispatch mode of a process imports parts of torch (seconds): not on the clock
            with _OpGuard(set(), self):
                torch.zeros(2, requires_grad=True).exp().sum().backward()
        # what is banned -> the name to show: code objects, source files, builtin functions (by id)
        self.codes, self.files, self.builtins, self.tensor_methods, self.file_names = {}, {}, {}, set(), {}
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
            name = self.codes.get(code) or (self.files and self.banned_file(code.co_filename))
            if name:
                self.refuse(name)
        elif event == "c_call":
            name = self.builtins.get(id(arg))
            if name is None and arg.__name__ in self.tensor_methods \
                    and isinstance(getattr(arg, "__self__", None), torch.Tensor):
                name = f"Tensor.{arg.__name__}"
            if name:
                self.refuse(name)

    def banned_file(self, filename):
        """The banned name of the module in `filename`, or None; realpath once per file name (it asks the file
        system, and this hook runs at every call)."""
        if filename not in self.file_names:
            self.file_names[filename] = self.files.get(os.path.realpath(filename))
        return self.file_names[filename]

    def refuse(self, name):
        self.refused = self.refused or (f"refused: your code called `{name}`, which this exercise asks you to "
                                        f"write yourself (directly or through another function)")
        raise Refused(self.refused)

    def __enter__(self):
        self.mode = _OpGuard(self.ops, self) if self.ops else None
        if self.mode is not None:
            self.mode.__enter__()
        self.previous, self.previous_for_threads = sys.getprofile(), threading.getprofile()
        threading.setprofile(self._in_a_new_thread)
        sys.setprofile(self)
        return self

    def __exit__(self, *exc):
        sys.setprofile(self.previous)
        threading.setprofile(self.previous_for_threads)
        if self.mode is not None:
            self.mode.__exit__(None, None, None)
        return False

    def _in_a_new_thread(self, frame, event, arg):
        """A new thread's first profile event (threading installs this hook): from then on the guard itself is
        the thread's hook, and its dispatch mode, which belongs to one thread, is entered for the thread's life."""
        sys.setprofile(self)
        if self.ops:
            _OpGuard(self.ops, self).__enter__()
        self(frame, event, arg)

