"""Lesson 6: checkpoints: everything a bit-exact resume needs, written atomically and read back with
weights_only=True (tensors and plain data only: loading a checkpoint runs no code)."""
from __future__ import annotations

import copy
import dataclasses
import io
import pickle
import random
import zipfile
from pathlib import Path

import torch
import torch.nn as nn

from .devices import unwrap
from .run_files import atomic_file

CHECKPOINT_FORMAT = "m07-checkpoint-v1"


class CheckpointError(ValueError):
    """A file that is not a usable checkpoint for this model."""


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "python": random.getstate()}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def save_checkpoint(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None, step: int, *,
                    scheduler=None, scaler: torch.amp.GradScaler | None = None, **extra) -> Path:
    """Write everything needed to resume training to `path`, atomically.

    Holds model, optimizer, scheduler and scaler state, the step, the torch/CUDA/Python RNG
    states, the model config, and any `extra` values (plain Python types and tensors only,
    so that weights_only loading can read them). The file is written to a temporary name
    in the same folder and renamed over `path` only when complete: a crash mid-write
    leaves the previous checkpoint intact, a failed write (disk full) raises an OSError
    naming `path`, and the temporary files of saves killed earlier are removed.
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    model = unwrap(model)
    config = getattr(model, "config", None)
    checkpoint = {
        "format": CHECKPOINT_FORMAT,
        "step": step,
        "model": model.state_dict(),
        "model_config": dataclasses.asdict(config) if dataclasses.is_dataclass(config) else None,
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": _rng_state(),
        "extra": extra,
    }
    buffer = io.BytesIO()  # serialized in memory first, so that a failed disk write raises a real OSError
    torch.save(checkpoint, buffer)
    path = Path(path)
    try:
        with atomic_file(path) as f:
            f.write(buffer.getbuffer())
    except OSError as error:  # disk full, file too large, permission denied
        raise OSError(f"could not write {path} ({error.strerror or error}); "
                      f"any earlier {path.name} is unchanged") from None
    return path


def read_checkpoint(path: str | Path, map_location=None) -> dict:
    """Load a checkpoint dict with weights_only=True: tensors and plain data only, no code runs.

    A file whose bytes changed since it was written (zip CRC-32), that holds code, is not a
    checkpoint or lacks one of its entries raises CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    _check_zip_crcs(path)
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"{path} was refused by the safe loader (weights_only=True): it holds objects "
                              f"other than tensors and plain data, such as code to run. Nothing from it "
                              f"was executed. ({first_line})") from None
    except Exception as error:  # noqa: BLE001 - any other failure means "not a readable torch file"
        raise CheckpointError(f"{path} is truncated or not a file written by torch.save "
                              f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is a torch file but not a training checkpoint (no {CHECKPOINT_FORMAT!r} marker)")
    _check_layout(path, checkpoint)
    return checkpoint


def _check_zip_crcs(path: Path) -> None:
    """torch.save writes a zip archive with a CRC-32 per record, which torch.load does not check:
    check them all, so flipped bytes in the tensor data are refused instead of trained on."""
    if not zipfile.is_zipfile(path):
        return  # not an archive at all: torch.load's refusal names the problem
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as error:
        raise CheckpointError(f"{path} is damaged: its zip structure does not read back ({error})") from None
    if damaged is not None:
        raise CheckpointError(f"{path} is damaged: record {damaged} fails its CRC-32 check "
                              f"(the bytes changed after the file was written)")


# key -> what a checkpoint holds there: the allowed types, and whether None is allowed too
_LAYOUT = {"step": (int, False), "model": (dict, False), "model_config": (dict, True), "optimizer": (dict, True),
           "scheduler": (dict, True), "scaler": (dict, True), "rng": (dict, False), "extra": (dict, False)}


def _check_layout(path: Path, checkpoint: dict) -> None:
    """Every key save_checkpoint writes is there with the right type, so nothing later fails with a KeyError."""
    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"{path} is a malformed checkpoint: {what}")
    for key, (kind, optional) in _LAYOUT.items():
        if key not in checkpoint:
            raise bad(f"no {key!r} entry")
        value = checkpoint[key]
        if not (isinstance(value, kind) and not isinstance(value, bool) or optional and value is None):
            raise bad(f"{key!r} is {type(value).__name__}, not {kind.__name__}")
    if checkpoint["step"] < 0:
        raise bad(f"'step' is {checkpoint['step']}")
    if not all(isinstance(k, str) and torch.is_tensor(v) for k, v in checkpoint["model"].items()):
        raise bad("'model' is not a mapping of names to tensors")
    rng = checkpoint["rng"]
    python = rng.get("python")
    if not (torch.is_tensor(rng.get("torch")) and rng["torch"].dtype == torch.uint8
            and isinstance(rng.get("cuda"), list)
            and isinstance(python, (tuple, list)) and len(python) == 3 and isinstance(python[1], (tuple, list))):
        raise bad("'rng' does not hold the torch, cuda and python random states")


def _check_state_dict(model: nn.Module, state: dict) -> None:
    """Name the first tensor that is missing, unexpected or the wrong shape."""
    own = model.state_dict()
    missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
    if missing or unexpected:
        raise CheckpointError(f"checkpoint does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, tensor in own.items():
        if tensor.shape != state[name].shape:
            raise CheckpointError(f"checkpoint does not fit the model: {name} has shape "
                                  f"{list(state[name].shape)} in the checkpoint, {list(tensor.shape)} in the model")


def load_checkpoint(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, *,
                    scheduler=None, scaler: torch.amp.GradScaler | None = None, map_location=None) -> int:
    """Restore model (and, when given, optimizer, scheduler, scaler) and the RNG states; return the step.

    Loads with weights_only=True. All or nothing: a file that is not a checkpoint, is truncated or
    damaged, holds code, or does not fit the model, the optimizer or this machine's random-number
    generators raises CheckpointError, and every object and random state is as it was before the call.
    """
    checkpoint = read_checkpoint(path, map_location=map_location)
    model = unwrap(model)
    targets = {name: obj for name, obj in (("optimizer", optimizer), ("scheduler", scheduler), ("scaler", scaler))
               if obj is not None}
    _check_state_dict(model, checkpoint["model"])
    for name in targets:
        if checkpoint[name] is None:
            raise CheckpointError(f"{path} holds no {name} state, but a {name} was given to restore")
    if optimizer is not None:
        _check_optimizer_state(path, optimizer, checkpoint["optimizer"])
    _check_rng_state(path, checkpoint["rng"])
    before = {"model": copy.deepcopy(model.state_dict()), "rng": _rng_state(),
              **{name: copy.deepcopy(obj.state_dict()) for name, obj in targets.items()}}
    try:
        # The optimizer, scheduler and scaler check their state as they load it: load them before the model.
        for name, obj in targets.items():
            try:
                obj.load_state_dict(checkpoint[name])
            except (KeyError, ValueError, TypeError, RuntimeError, IndexError) as error:
                raise CheckpointError(f"{path}: its {name} state does not fit this {name} "
                                      f"({type(error).__name__}: {error})") from None
        model.load_state_dict(checkpoint["model"])
        try:
            _set_rng_state(checkpoint["rng"])
        except (ValueError, TypeError, RuntimeError) as error:
            raise CheckpointError(f"{path}: its random-number-generator state does not load ({error})") from None
    except BaseException:
        model.load_state_dict(before["model"])
        for name, obj in targets.items():
            obj.load_state_dict(before[name])
        _set_rng_state(before["rng"])
        raise
    return checkpoint["step"]


def _check_optimizer_state(path: Path, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """The saved optimizer state fits `optimizer`: as many groups of as many parameters, and every
    per-parameter tensor (a moment, a momentum buffer) of its parameter's shape."""
    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"{path}: its optimizer state does not fit this optimizer: {what}")
    groups, per_param = state.get("param_groups"), state.get("state")
    if not isinstance(groups, list) or not isinstance(per_param, dict):
        raise bad("it lacks 'param_groups' or 'state'")
    if len(groups) != len(optimizer.param_groups):
        raise bad(f"{len(groups)} parameter groups saved, {len(optimizer.param_groups)} here")
    params = {}
    for number, (saved, live) in enumerate(zip(groups, optimizer.param_groups)):
        if not isinstance(saved, dict) or len(saved.get("params", ())) != len(live["params"]):
            raise bad(f"group {number} holds {len(saved.get('params', ())) if isinstance(saved, dict) else '?'} "
                      f"parameters saved, {len(live['params'])} here")
        params.update(zip(saved["params"], live["params"]))
    for key, entries in per_param.items():
        if key not in params or not isinstance(entries, dict):
            raise bad(f"state for a parameter {key!r} it does not have")
        for name, value in entries.items():
            if torch.is_tensor(value) and value.dim() and value.shape != params[key].shape:
                raise bad(f"{name!r} of parameter {key} has shape {list(value.shape)}, the parameter "
                          f"{list(params[key].shape)}")


def _check_rng_state(path: Path, rng: dict) -> None:
    """The saved random states would load on this machine (checked on throwaway generators)."""
    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"{path}: its random-number-generator state does not load ({what})")
    if rng["torch"].shape != torch.get_rng_state().shape:
        raise bad(f"a torch state of {rng['torch'].numel()} bytes, {torch.get_rng_state().numel()} expected")
    try:
        version, internal, gauss = rng["python"]
        random.Random().setstate((version, tuple(internal), gauss))
    except (ValueError, TypeError) as error:
        raise bad(f"the Python state: {error}") from None
    if rng["cuda"] and torch.cuda.is_available():
        if not all(torch.is_tensor(t) and t.dtype == torch.uint8 for t in rng["cuda"]):
            raise bad("the CUDA states are not byte tensors")
